"""The ldmscale command line: one module per verb group."""

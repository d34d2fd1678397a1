"""The model family: sizes, exact parameter and FLOP accounting, FSDP sharding."""

"""Analysis of a study's results: scaling fits, the paper's claims, figures, the report."""

"""Reading corpora and writing results: kept apart from the operators' logic."""

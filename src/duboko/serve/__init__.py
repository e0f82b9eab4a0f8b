"""`duboko serve`: a local web studio over run folders (FastAPI, an optional extra)."""

"""Files and places: model directories and bundles, latent codecs, the text path, MP4, prompt datasets, and
storage (local paths or ``s3://``: Parquet datasets, fetch cache, content hashes). No Ray, no MLflow.
"""

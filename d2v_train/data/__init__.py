"""The streaming loader: index.py reads a split's Parquet indexes, plan.py plans epochs from them,
reader.py fetches samples with ranged reads (payload checksums checked), modalities.py decodes and
collates each modality (decode.py, collate.py), loader.py runs it as a resumable torchdata pipeline."""

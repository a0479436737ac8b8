"""The streaming loader: index.py reads a split's Parquet indexes, plan.py plans epochs from them,
reader.py fetches samples with ranged reads (payload checksums checked), modalities.py holds what differs per
modality (decode, collate, rate unit, stream plan, a single input for `encode`; decode.py,
collate.py), batches.py types the batches, loader.py runs it as a resumable torchdata pipeline."""

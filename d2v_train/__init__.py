"""Pre-training and evaluation (torch): data/ streams shards into batches, models/ holds the
encoders and the data2vec objectives, trainer.py runs FSDP2 pre-training (main.py under
`python -m d2v_train.launch`), checkpoint.py saves and resumes, eval/ scores encoders downstream.
Imports schemas and pipelines, never flows."""

"""Pre-training and evaluation (torch): data/ streams shards into batches, models/ holds the
encoders and the data2vec objectives, trainer.py runs FSDP2 pre-training (main.py under
`python -m d2v_train.launch`) from components: step.py (forward/backward, the optimizer step),
guards.py (non-finite, collapse), checkpointer.py (the stateful parts; checkpoint.py the folders);
eval/ scores encoders downstream, each task from its validated config (eval/config.py).
Imports schemas and pipelines, never flows."""

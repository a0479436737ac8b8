"""Downstream evaluation of pre-trained encoders: speech CTC -> WER/CER, image probe and fine-tune
-> top-1/top-5, text classification -> accuracy/F1/MCC, and reports comparing checkpoints.
config.py: each task's settings as a validated model (its command-line options are made from it);
tasks.py: the task modules and one run; curve_run.py: label-efficiency curves."""

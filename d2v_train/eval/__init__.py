"""Downstream evaluation of pre-trained encoders: speech CTC -> WER/CER, image probe and fine-tune
-> top-1/top-5, text classification -> accuracy/F1/MCC, and reports comparing checkpoints."""

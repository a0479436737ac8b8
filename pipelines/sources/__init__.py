"""Corpus sources, one module per layout (librispeech, imagenet, text) on base.Source;
registry.py names them for `d2v data build` and the flow."""

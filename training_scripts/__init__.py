"""Command-line entry points: pre-training, linear probe, k-NN and fine-tuning (`python training_scripts/NAME.py`)."""

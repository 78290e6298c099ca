"""The end-to-end demo: train, export, calibrate, evaluate and predict on a shipped SST-2 sample."""

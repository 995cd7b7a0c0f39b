"""Super Expert calibration: per-expert output maxima and massive activations of a live model."""

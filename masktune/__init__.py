"""The library beside the scripts: data, planted shortcuts, saliency masks, the training loop, the MaskTune
pipeline, metrics and selective classification."""

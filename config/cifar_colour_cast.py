"""Held-out benchmark, not local: every pixel of 95% of each class's CIFAR-10 training images moved a quarter
of the way towards the class's colour (another class's colour on the rest). No mask can remove it: it
measures the method's limit."""

shortcut = "colour_cast"
shortcut_ratio = 0.95
num_epochs = 6
checkpoint_dir = "checkpoints/cifar_colour_cast"
out_dir = "out/cifar_colour_cast"

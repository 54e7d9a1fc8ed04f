"""Held-out benchmark: the class is carried by shape, not colour: a 4x4 tile of white and black pixels,
one pattern per class (the same number of white pixels in each), in the bottom-right corner of 95% of each
class's CIFAR-10 training images (another class's pattern on the rest)."""

shortcut = "shape"
shortcut_ratio = 0.95
shortcut_size = 4
shortcut_position = "bottom_right"
num_epochs = 6
checkpoint_dir = "checkpoints/cifar_shape"
out_dir = "out/cifar_shape"

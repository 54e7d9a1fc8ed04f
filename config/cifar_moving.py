"""Held-out benchmark: the class-coloured 4x4 square of cifar_square.py, but at a random place in every
image (95% of each class's CIFAR-10 training images carry their class's colour, the rest another's)."""

shortcut = "moving_square"
shortcut_ratio = 0.95
shortcut_size = 4
num_epochs = 6
checkpoint_dir = "checkpoints/cifar_moving"
out_dir = "out/cifar_moving"

"""Development benchmark: a shortcut of a very different size: a class-coloured 12x12 square (9 times the
area of cifar_square.py's, 14% of the image) in the bottom-left corner of 95% of each class's CIFAR-10
training images (another class's colour on the rest)."""

shortcut = "square"
shortcut_ratio = 0.95
shortcut_size = 12
shortcut_position = "bottom_left"
num_epochs = 6
checkpoint_dir = "checkpoints/cifar_big_square"
out_dir = "out/cifar_big_square"

"""Development benchmark: on 95% of each class's CIFAR-10 training images a 4x4 square of the class's
colour in the top-left corner, another class's colour on the rest. ERM trains for 6 epochs."""

shortcut = "square"
shortcut_ratio = 0.95
shortcut_size = 4
shortcut_position = "top_left"
num_epochs = 6
checkpoint_dir = "checkpoints/cifar_square"
out_dir = "out/cifar_square"

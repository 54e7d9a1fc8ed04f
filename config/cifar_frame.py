"""Development benchmark: a large, thin shortcut: a border 3 pixels wide (34% of the image) of a
black-and-white texture tied to the class, on 95% of each class's CIFAR-10 training images (another class's
texture on the rest)."""

shortcut = "frame"
shortcut_ratio = 0.95
shortcut_size = 3
num_epochs = 6
checkpoint_dir = "checkpoints/cifar_frame"
out_dir = "out/cifar_frame"

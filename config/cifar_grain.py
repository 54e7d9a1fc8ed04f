"""Development benchmark, not local: each class's own fixed pattern of +-16 grey levels over every pixel, as a
camera's sensor noise, on 95% of each class's CIFAR-10 training images (another class's pattern on the
rest). No mask can remove it: the masks must find nothing decisive, and the fine-tune must do no harm."""

shortcut = "grain"
shortcut_ratio = 0.95
num_epochs = 6
checkpoint_dir = "checkpoints/cifar_grain"
out_dir = "out/cifar_grain"

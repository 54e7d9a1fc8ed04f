"""The MaskTune paper's biased MNIST: digits 0-4 are class 0 and 5-9 class 1; a red 4x4 square in the
top-left corner on 99% of the class-0 and 1% of the class-1 training images (picked at random). Tested on
the original digits (clean) and on the paper's biased test (conflicting: the square on every class-1 image,
none on class 0). No augmentation, as in the paper."""

dataset = "mnist"
shortcut = "square"
shortcut_classes = "first"
shortcut_ratio = 0.99
shortcut_size = 4
shortcut_position = "top_left"
num_epochs = 20
learning_rate = 0.01  # at vgg.py's 0.02 the loss diverged for 2 of 4 seeds
augment = False
checkpoint_dir = "checkpoints/mnist_paper"
out_dir = "out/mnist_paper"

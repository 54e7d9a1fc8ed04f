"""Held-out benchmark, Waterbirds-like: every CIFAR-10 image shrunk to 16x16 (a quarter of the image) in the
centre of a scene tied to the class: the surroundings of another photo of the image's own class on 95% of
each class's training images, of another class on the rest. Clean test images show the objects on grey."""

shortcut = "scene"
shortcut_ratio = 0.95
shortcut_size = 16
num_epochs = 6
checkpoint_dir = "checkpoints/cifar_scene"
out_dir = "out/cifar_scene"

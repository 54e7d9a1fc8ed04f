"""ResNet50 on the Waterbirds-like scene: two CIFAR-10 classes as an image folder (as in
resnet50_cifar_square.py), upsampled to 64x64 and trained from scratch; every object shrunk to 32x32 in the
centre of a scene from another photo of its class on 95% of each class's training images."""

shortcut = "scene"
shortcut_ratio = 0.95
shortcut_size = 32
image_size = 64
pretrained = False
num_epochs = 2  # with 8, two runs ended at chance on every split; 2 learn the objects (75% clean)
learning_rate = 0.01
eval_batch_size = 256
checkpoint_dir = "checkpoints/resnet50_cifar_scene"
out_dir = "out/resnet50_cifar_scene"

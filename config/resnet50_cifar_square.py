"""ResNet50 on a planted square: two CIFAR-10 classes as an image folder (`--data_dir` holding train/airplane,
train/automobile, test/airplane, test/automobile), upsampled to 64x64 and trained from scratch. On 95% of
each class's training images an 8x8 square of the class's colour sits top left (vgg.py's 4x4 of 32x32)."""

shortcut = "square"
shortcut_ratio = 0.95
shortcut_size = 8
image_size = 64
pretrained = False
num_epochs = 8
learning_rate = 0.01
eval_batch_size = 256
checkpoint_dir = "checkpoints/resnet50_cifar_square"
out_dir = "out/resnet50_cifar_square"

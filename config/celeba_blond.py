"""The MaskTune paper's CelebA benchmark for resnet50.py: predict Blond_Hair; groups (Blond_Hair, Male).
Its official code's settings: an ImageNet ResNet50 at 224x224, SGD at 1e-4 (constant) with weight decay
1e-4, batch 512, 20 epochs; then MaskTune as published (XGradCAM masks set to black, one epoch from the last
ERM epoch at the ERM's learning rate). A GPU job: 162,770 training images, 24 GB as uint8 tensors.
The paper: worst-group accuracy 78.0 (ERM 47.2)."""

dataset = "celeba"
target_attributes = ["Blond_Hair"]
spurious_attribute = "Male"
image_size = 224
subset_size = 0
eval_subset_size = 0
pretrained = True
batch_size = 512
num_epochs = 20
learning_rate = 1e-4
weight_decay = 1e-4
masking = "xgradcam"
mask_extent = "fixed"
mask_std = 2.0
mask_fill = "black"
finetune_from = "last"
finetune_epochs = 1
finetune_min_steps = 0
finetune_learning_rate = 1e-4
finetune_schedule = "constant"
checkpoint_dir = "checkpoints/celeba_blond"
out_dir = "out/celeba_blond"

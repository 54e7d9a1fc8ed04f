"""The MaskTune paper's Waterbirds benchmark for resnet50.py (data_dir: the folder with metadata.csv).
Its official code's settings: an ImageNet ResNet50 at 224x224, SGD at 1e-4 (constant), batch 128, 100
epochs; then MaskTune as published (XGradCAM masks set to black, one epoch from the last ERM epoch at the
ERM's learning rate). The paper: worst-group accuracy 86.4, average 93.0."""

dataset = "waterbirds"
data_dir = "data/waterbirds"
image_size = 224
subset_size = 0
eval_subset_size = 0
pretrained = True
batch_size = 128
num_epochs = 100
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
checkpoint_dir = "checkpoints/waterbirds"
out_dir = "out/waterbirds"

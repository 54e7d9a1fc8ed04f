"""MaskTune as published, in its official code: XGradCAM masks of the best-validation ERM model (pixels
above mean + 2 std of the positive CAM) set to black; one epoch of fine-tuning from the LAST ERM epoch and
its optimizer state, at the ERM's learning rate (its peak: 0.02 is vgg.py's; after a recipe with another
learning_rate, pass that too). Combine it with a data recipe:
    python vgg.py config/cifar_square.py config/paper_protocol.py
    python vgg.py config/mnist_paper.py config/paper_protocol.py --finetune_learning_rate=0.01"""

masking = "xgradcam"
mask_extent = "fixed"
mask_std = 2.0
mask_fill = "black"
mask_rounds = 1
finetune_from = "last"
finetune_epochs = 1
finetune_min_steps = 0
finetune_learning_rate = 0.02
finetune_schedule = "constant"

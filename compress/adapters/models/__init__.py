"""Built-in model definitions that need no torchvision or timm."""

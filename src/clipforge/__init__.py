"""clipforge — CLIP, contrastive language–image pretraining: the loss, the model,
training and applications.  Importing the package has no side effects."""

from clipforge.loss import ClipLoss, LogitScale, SigLipLoss, clip_loss, siglip_loss

__version__ = "0.1.0"

__all__ = ["ClipLoss", "SigLipLoss", "LogitScale", "clip_loss", "siglip_loss", "__version__"]

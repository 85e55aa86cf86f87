"""The learning core: Med3D (model), MONAI transforms and cached datasets (transforms, data), the training and
prediction loops and loaders (train), metrics with bootstrap CIs (metrics), Grad-CAM (saliency).

Imports only the foundation modules of ``common`` (keys, errors, files, device, config)."""

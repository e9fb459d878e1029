"""The feature-field algorithm shared by the model and GS-Net: contrastive losses, class metrics, relevancy, 3D selection."""

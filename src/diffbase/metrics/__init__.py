"""Numbers a paper would print, from maintained libraries: SSIM and PSNR (torchmetrics), FID and KID (torchmetrics
over the features of a network the user names by its local path: DINOv2, CLIP or, with torch-fidelity, FID's
Inception), CLIP-T and CLIP-I (torchmetrics' CLIP score), DINO similarity and face similarity (insightface, from a
local model pack). Nothing here downloads."""

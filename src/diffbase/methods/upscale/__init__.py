"""Tiled upscaling guided by DINO features (`training.method: upscale`, formerly `upscale_dino`, `diffbase upscale`, the Upscale
tab). method.py is the record, mechanism/ the tiles, DINO guidance and sampling, command.py and ui.py its
command and tab."""

"""Virtual try-on: VTON and CatVTON on SD1.5 inpainting (`training.method: tryon`, formerly `vton`, `diffbase tryon`, the Try-on
tab). method.py is the record, mechanism/ the canvas, masks, sampling and metrics, command.py and ui.py
its command and tab."""

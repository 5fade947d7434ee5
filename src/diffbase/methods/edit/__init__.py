"""Reference editing (FLUX Kontext, FLUX.2) and inpainting (FLUX Fill, FLUX.2 klein): `training.method:
kontext` / `fill`, `diffbase edit` / `diffbase inpaint`, the Edit tab. method.py holds both records,
mechanism.py the conditioning and pipelines, command.py and ui.py its commands and tab."""

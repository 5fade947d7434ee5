"""DreamO: identity, subject, style and try-on customization on FLUX.1 (`training.method: dreamo`,
`diffbase dreamo`, also `diffbase customize`; the DreamO tab). method.py is the record, mechanism/ the
conditions, routing, preprocessing and files, command.py and ui.py its command and tab."""

"""DreamFit: garment-centric person generation and try-on on FLUX.1 (`training.method: dreamfit`,
`diffbase dreamfit`, the DreamFit tab). method.py is the record, mechanism/ the write and read passes,
its LoRAs and checkpoint format, command.py and ui.py its command and tab."""

"""Training: the compiled step (`step`), the driver that sets a run up and resumes it (`trainer`), the host
loop (`loop`), and what starts from another run: fine-tuning (`finetune`) and distillation (`distill`);
the learning-rate range test (`lr_find`) and the config checks every command runs first (`config_checks`)."""

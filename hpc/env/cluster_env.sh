# Environment for MASAN training tasks on a cluster: sourced by every SLURM job that
# launch/submit.py writes (before srun), and fine to source in an interactive job.
# Every value is a default: a variable already set in the submitting shell wins.

# --- CPU threads: one rank per GPU, SLURM gives each rank --cpus-per-task cores. Without
# this, every rank starts one OpenMP thread per core of the node and they oversubscribe.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}"
export MKL_NUM_THREADS="${MKL_NUM_THREADS:-$OMP_NUM_THREADS}"

# --- NCCL (GPU jobs). Errors surface as exceptions instead of hangs, and a hung collective
# fails after the process-group timeout instead of blocking the allocation forever.
export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"
# WARN shows init problems (wrong interface, no InfiniBand) without flooding logs; use INFO
# once to check which transport (NET/IB or NET/Socket) a new cluster picks.
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
# Interfaces: set NCCL_SOCKET_IFNAME (e.g. ib0, or ^docker,lo to exclude) and, for InfiniBand,
# NCCL_IB_HCA (e.g. mlx5) when NCCL picks the wrong network; left unset, NCCL auto-detects.
# Gloo (CPU jobs) honours GLOO_SOCKET_IFNAME the same way.

# --- SLURM signals: submitit's preemption signal. Never USR1: NCCL uses it internally.
export SUBMITIT_PREEMPT_SIGNAL="${SUBMITIT_PREEMPT_SIGNAL:-USR2}"

# --- Python output reaches the job log at once (progress and the stop/requeue messages).
export PYTHONUNBUFFERED=1

# --- DeepSpeed JIT-builds small ops (e.g. the CPU shm comm op) on first use into
# TORCH_EXTENSIONS_DIR (default ~/.cache/torch_extensions/py<ver>_<cpu|cu...>); the first job
# on a fresh home directory spends about a minute compiling, later jobs load the cached build.

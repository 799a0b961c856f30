# Settings for NVIDIA GPU nodes; copy to launch/env/<site>.sh and adapt to your fabric.
# One CPU thread per rank for torch ops that fall back to the CPU (avoid oversubscription).
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}"
# Lets megatron-core overlap tensor-parallel communication with GEMMs in a single stream order.
export CUDA_DEVICE_MAX_CONNECTIONS=1
# Fail fast instead of hanging forever when a rank dies inside a collective.
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1
# Keep the allocator from fragmenting under changing activation shapes.
export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"

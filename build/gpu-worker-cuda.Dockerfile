# The CUDA worker image. The SDK's container publish cannot add packages to a base image, and the NVIDIA CUDA base has
# neither ICU (which .NET's globalization and the tokenizer's NFC normalization need: docs/decisions.md) nor a non-root
# user, so this image is built from a Dockerfile around the self-contained publish:
#   dotnet publish GpuWorker -c Release -r linux-x64 --self-contained -p:TorchBackend=cuda -o publish/gpu-worker-cuda
#   docker build -f build/gpu-worker-cuda.Dockerfile -t <registry>/deepseek/gpu-worker:1.0.0-cuda publish/gpu-worker-cuda
# The runtime flavour of the CUDA image brings libnccl.so.2 (gpu-worker check names the one it loads); libcuda.so.1
# comes from the node's driver through the NVIDIA container runtime. Pick the CUDA version TorchSharp-cuda-linux needs.
FROM nvcr.io/nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

# libicu74: globalization and NFC; ca-certificates: https to Blob storage and the cluster's TLS; tzdata: time zones.
RUN apt-get update \
 && apt-get install -y --no-install-recommends libicu74 ca-certificates tzdata \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid 1654 app \
 && useradd --uid 1654 --gid 1654 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin app

WORKDIR /app
COPY --chown=0:0 . /app

# The UID the manifests run as (runAsUser 1654), as a number so that the kubelet can verify runAsNonRoot.
USER 1654:1654
ENV DOTNET_RUNNING_IN_CONTAINER=true \
    HOME=/tmp \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
ENTRYPOINT ["/app/gpu-worker"]
CMD ["join"]

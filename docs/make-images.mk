# Container images: `make images IMAGE_REPO=ghcr.io/lora-operator [IMAGE_TAG=0.1.0]`
# builds and pushes $(IMAGE_REPO)/operator:$(IMAGE_TAG) and $(IMAGE_REPO)/trainer:$(IMAGE_TAG).
# Included from the Makefile. Needs docker (or a CLI with the same build/push verbs via DOCKER=).
# The build context is the repository root; .dockerignore keeps it to the sources.
# Both images install through requirements/constraints.txt, the lock `make install` and the tests
# use: the same versions, the same torch (a CUDA build in the trainer image) and the same Python.

IMAGE_REPO ?=
IMAGE_TAG ?= $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
DOCKER ?= docker
DOCKER_BUILD_FLAGS ?=
OPERATOR_IMAGE = $(IMAGE_REPO)/operator:$(IMAGE_TAG)
TRAINER_IMAGE = $(IMAGE_REPO)/trainer:$(IMAGE_TAG)

.PHONY: images image-operator image-trainer images-push _require-image-repo

images: image-operator image-trainer ## build, then push both images (IMAGE_REPO=..., IMAGE_TAG=...)
	$(MAKE) -f $(firstword $(MAKEFILE_LIST)) images-push IMAGE_REPO=$(IMAGE_REPO) IMAGE_TAG=$(IMAGE_TAG)

image-operator: _require-image-repo ## build the operator image (no torch)
	$(DOCKER) build $(DOCKER_BUILD_FLAGS) -f operator/Dockerfile -t $(OPERATOR_IMAGE) .

image-trainer: _require-image-repo ## build the trainer image (CUDA + torch)
	$(DOCKER) build $(DOCKER_BUILD_FLAGS) -f trainer_image/Dockerfile -t $(TRAINER_IMAGE) .

images-push: _require-image-repo ## push both images (already built)
	$(DOCKER) push $(OPERATOR_IMAGE)
	$(DOCKER) push $(TRAINER_IMAGE)

_require-image-repo:
	@test -n "$(IMAGE_REPO)" || { echo "set IMAGE_REPO, e.g. make images IMAGE_REPO=ghcr.io/lora-operator" >&2; exit 2; }

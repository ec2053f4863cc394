// edgeenc-embed: embeddings (and top-k labels) of one recording from a bundle's model.onnx.
// Usage and output formats: `edgeenc-embed --help` and cpp/README.md.

#include "edgeenc_embed.hpp"

#include <chrono>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <numeric>

namespace {

// Exit codes: 2 for a bad command line or labels file, 3 for the model, 4 for the audio.
constexpr int kExitUsage = 2;
constexpr int kExitModel = 3;
constexpr int kExitAudio = 4;

const char* const kUsage = R"(usage: edgeenc-embed MODEL AUDIO [options]

  MODEL            an edgeenc model.onnx, or a bundle folder (its model.onnx is used)
  AUDIO            a WAV, FLAC, OGG, MP3 ... file (any rate, any channels; averaged, resampled)

options:
  --window S       window length in seconds (default: the model's window_seconds)
  --hop S          seconds between window starts (default: the window length)
  --last POLICY    the final partial window: auto (default: its true length, but dropped when
                   under half the window or 1 s, unless it is the file's only window), short
                   (its true length), pad (zeros to the window length) or drop
  --batch N        windows per inference call (default 8)
  --threads N      ONNX Runtime intra-op threads (default: ONNX Runtime's)
  --labels FILE    labels.json of a classifier bundle: print the top-k labels of each window
                   (probe_labels.json for a bundle with a probe attached: its probe is the default head)
  --top-k K        labels per window with --labels (default 5)
  --json           one JSON document instead of one line per window
  --timing         print model load, decode and inference times to stderr

output: one line per window, "start end v0 ... vN-1" (seconds, then the embedding); with
--labels, "start<TAB>end<TAB>label<TAB>score..." with the head's scores (sigmoid or softmax, as the model's
metadata says), best first.
)";

struct Options {
  std::string model, audio, labels;
  std::optional<double> window, hop;
  edgeenc::LastPolicy last = edgeenc::LastPolicy::Auto;
  int batch = 8, threads = 0, top_k = 5;
  bool json = false, timing = false;
};

struct UsageError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

double positive_number(const std::string& flag, const std::string& text) {
  char* end = nullptr;
  double v = std::strtod(text.c_str(), &end);
  if (text.empty() || *end != '\0' || !(v > 0) || !std::isfinite(v))
    throw UsageError(flag + " needs a positive number, got '" + text + "'");
  return v;
}

int positive_int(const std::string& flag, const std::string& text) {
  char* end = nullptr;
  long v = std::strtol(text.c_str(), &end, 10);
  if (text.empty() || *end != '\0' || v < 1 || v > 1000000)
    throw UsageError(flag + " needs a positive integer, got '" + text + "'");
  return static_cast<int>(v);
}

Options parse_args(int argc, char** argv) {
  Options o;
  std::vector<std::string> positional;
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) throw UsageError(arg + " needs a value");
      return argv[++i];
    };
    if (arg == "-h" || arg == "--help") {
      std::cout << kUsage;
      std::exit(0);
    } else if (arg == "--window") o.window = positive_number(arg, value());
    else if (arg == "--hop") o.hop = positive_number(arg, value());
    else if (arg == "--batch") o.batch = positive_int(arg, value());
    else if (arg == "--threads") o.threads = positive_int(arg, value());
    else if (arg == "--top-k") o.top_k = positive_int(arg, value());
    else if (arg == "--labels") o.labels = value();
    else if (arg == "--json") o.json = true;
    else if (arg == "--timing") o.timing = true;
    else if (arg == "--last") {
      try {
        o.last = edgeenc::parse_last_policy(value());
      } catch (const std::invalid_argument& e) {
        throw UsageError(std::string("--") + e.what());
      }
    } else if (arg.size() > 1 && arg[0] == '-') throw UsageError("unknown option " + arg + " (see --help)");
    else positional.push_back(arg);
  }
  if (positional.size() != 2) throw UsageError("expected MODEL and AUDIO (see --help)");
  o.model = positional[0];
  o.audio = positional[1];
  struct stat st {};
  if (::stat(o.model.c_str(), &st) == 0 && S_ISDIR(st.st_mode)) o.model += "/model.onnx";
  return o;
}

// labels.json is a JSON array of strings (export writes it with json.dump): parse just that.
std::vector<std::string> read_labels(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw UsageError(path + ": cannot open the labels file");
  std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  auto bad = [&](const char* why) { return UsageError(path + ": not a JSON list of label strings (" + why + ")"); };
  size_t i = 0;
  auto skip_space = [&] { while (i < text.size() && std::isspace(static_cast<unsigned char>(text[i]))) ++i; };
  auto hex4 = [&]() -> unsigned {
    if (i + 4 > text.size()) throw bad("cut \\u escape");
    unsigned v = static_cast<unsigned>(std::stoul(text.substr(i, 4), nullptr, 16));
    i += 4;
    return v;
  };
  auto put_utf8 = [](std::string& s, unsigned cp) {
    if (cp < 0x80) s += char(cp);
    else if (cp < 0x800) s += char(0xC0 | cp >> 6), s += char(0x80 | (cp & 0x3F));
    else if (cp < 0x10000) s += char(0xE0 | cp >> 12), s += char(0x80 | (cp >> 6 & 0x3F)), s += char(0x80 | (cp & 0x3F));
    else s += char(0xF0 | cp >> 18), s += char(0x80 | (cp >> 12 & 0x3F)), s += char(0x80 | (cp >> 6 & 0x3F)),
         s += char(0x80 | (cp & 0x3F));
  };
  std::vector<std::string> labels;
  skip_space();
  if (i >= text.size() || text[i++] != '[') throw bad("no opening [");
  skip_space();
  if (i < text.size() && text[i] == ']') return labels;
  for (;;) {
    skip_space();
    if (i >= text.size() || text[i++] != '"') throw bad("an item is not a string");
    std::string label;
    while (i < text.size() && text[i] != '"') {
      char c = text[i++];
      if (c != '\\') { label += c; continue; }
      if (i >= text.size()) throw bad("cut escape");
      char e = text[i++];
      switch (e) {
        case 'n': label += '\n'; break;
        case 't': label += '\t'; break;
        case 'r': label += '\r'; break;
        case 'b': label += '\b'; break;
        case 'f': label += '\f'; break;
        case 'u': {
          unsigned cp = hex4();
          if (cp >= 0xD800 && cp < 0xDC00 && i + 1 < text.size() && text[i] == '\\' && text[i + 1] == 'u') {
            i += 2;
            cp = 0x10000 + ((cp - 0xD800) << 10) + (hex4() - 0xDC00);
          }
          put_utf8(label, cp);
          break;
        }
        default: label += e;  // \" \\ \/
      }
    }
    if (i >= text.size()) throw bad("unterminated string");
    ++i;
    labels.push_back(label);
    skip_space();
    if (i < text.size() && text[i] == ',') { ++i; continue; }
    if (i < text.size() && text[i] == ']') return labels;
    throw bad("expected , or ]");
  }
}

std::string json_string(const std::string& s) {
  std::string out = "\"";
  for (unsigned char c : s) {
    if (c == '"' || c == '\\') out += '\\', out += char(c);
    else if (c < 0x20) {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\u%04x", c);
      out += buf;
    } else out += char(c);
  }
  return out + "\"";
}

// %.9g round-trips a float32 exactly; %.10g keeps window times to well under a microsecond.
void put_float(std::string& out, float v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.9g", static_cast<double>(v));
  out += buf;
}

std::string seconds(double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.10g", v);
  return buf;
}

// Scores of one row of logits by the head's activation (sigmoid: independent labels; softmax: one label per
// window), in double as the Python runtime computes them.
std::vector<std::pair<double, size_t>> top_k(const float* logits, size_t classes, int k, const std::string& activation) {
  std::vector<std::pair<double, size_t>> ranked(classes);
  if (activation == "sigmoid") {
    for (size_t c = 0; c < classes; ++c) ranked[c] = {1.0 / (1.0 + std::exp(-double(logits[c]))), c};
  } else {
    double peak = *std::max_element(logits, logits + classes), total = 0;
    for (size_t c = 0; c < classes; ++c) total += ranked[c].first = std::exp(double(logits[c]) - peak);
    for (size_t c = 0; c < classes; ++c) ranked[c] = {ranked[c].first / total, c};
  }
  // Stable, so ties keep logit order as numpy's argsort(kind="stable") does.
  std::stable_sort(ranked.begin(), ranked.end(), [](auto& a, auto& b) { return a.first > b.first; });
  ranked.resize(std::min<size_t>(classes, static_cast<size_t>(k)));
  return ranked;
}

using Clock = std::chrono::steady_clock;
double ms_since(Clock::time_point t) { return std::chrono::duration<double, std::milli>(Clock::now() - t).count(); }

int run(const Options& o) {
  auto t0 = Clock::now();
  edgeenc::Model model(o.model, o.threads);
  const edgeenc::ModelInfo& info = model.info();
  double load_ms = ms_since(t0);
  std::vector<std::string> labels;
  if (!o.labels.empty()) {
    if (info.num_classes == 0)
      throw UsageError(o.model + ": " + info.model_id + " has no classifier head; drop --labels");
    labels = read_labels(o.labels);
    if (static_cast<int64_t>(labels.size()) != info.num_classes)
      throw UsageError(o.labels + ": " + std::to_string(labels.size()) + " labels, but the model has " +
                       std::to_string(info.num_classes) + " classes");
  }
  auto t1 = Clock::now();
  std::vector<float> audio = edgeenc::read_mono(o.audio, info.sample_rate);
  double decode_ms = ms_since(t1);
  const int64_t total = static_cast<int64_t>(audio.size());
  if (total < info.min_samples)
    throw edgeenc::Error(edgeenc::ErrorKind::Input,
                         o.audio + ": " + std::to_string(total) + " samples at " + std::to_string(info.sample_rate) +
                             " Hz is shorter than the model's minimum of " + std::to_string(info.min_samples));
  std::vector<edgeenc::WindowSpan> spans;
  try {
    spans = edgeenc::cut_windows(total, info.sample_rate, o.window.value_or(info.window_seconds), o.hop,
                                 info.min_samples, o.last);
  } catch (const std::invalid_argument& e) {
    throw UsageError(e.what());
  }
  if (spans.empty())
    throw edgeenc::Error(edgeenc::ErrorKind::Input, o.audio + ": no window of at least " +
                                                        std::to_string(info.min_samples) +
                                                        " samples (the file is too short)");

  // Windows of one length run together, up to --batch at a time (only the last one may differ).
  auto t2 = Clock::now();
  std::vector<float> embeddings(spans.size() * static_cast<size_t>(info.embedding_dim));
  std::vector<float> logits(spans.size() * static_cast<size_t>(info.num_classes));
  for (size_t begin = 0; begin < spans.size();) {
    size_t end = begin + 1;
    while (end < spans.size() && end - begin < static_cast<size_t>(o.batch) && spans[end].length == spans[begin].length)
      ++end;
    std::vector<edgeenc::WindowSpan> group(spans.begin() + begin, spans.begin() + end);
    edgeenc::BatchOutput out = model.run(edgeenc::batch_samples(audio, group), group.size(), group.front().length);
    std::copy(out.embedding.begin(), out.embedding.end(), embeddings.begin() + begin * info.embedding_dim);
    std::copy(out.logits.begin(), out.logits.end(), logits.begin() + begin * info.num_classes);
    begin = end;
  }
  double infer_ms = ms_since(t2);

  const int rate = info.sample_rate;
  std::string text;
  if (o.json) {
    text = "{\"model\": " + json_string(o.model) + ", \"model_id\": " + json_string(info.model_id) +
           ", \"licence\": " + json_string(info.licence) + ", \"random_init\": " +
           (info.random_init ? "true" : "false") + ", \"activation\": " + json_string(info.activation) +
           ", \"sample_rate\": " + std::to_string(rate) +
           ", \"audio\": " + json_string(o.audio) + ", \"windows\": [";
  }
  for (size_t w = 0; w < spans.size(); ++w) {
    const float* emb = embeddings.data() + w * info.embedding_dim;
    std::string start = seconds(spans[w].start_seconds(rate)), end = seconds(spans[w].end_seconds(rate));
    std::vector<std::pair<double, size_t>> best;
    if (!labels.empty())
      best = top_k(logits.data() + w * info.num_classes, info.num_classes, o.top_k, info.activation);
    if (o.json) {
      text += std::string(w ? ", " : "") + "{\"start\": " + start + ", \"end\": " + end + ", \"embedding\": [";
      for (int64_t d = 0; d < info.embedding_dim; ++d) {
        if (d) text += ", ";
        put_float(text, emb[d]);
      }
      text += "]";
      if (!labels.empty()) {
        text += ", \"top_k\": [";
        for (size_t r = 0; r < best.size(); ++r)
          text += std::string(r ? ", " : "") + "{\"label\": " + json_string(labels[best[r].second]) +
                  ", \"score\": " + seconds(best[r].first) + "}";
        text += "]";
      }
      text += "}";
    } else if (!labels.empty()) {
      text += start + "\t" + end;
      for (const auto& [score, cls] : best) text += "\t" + labels[cls] + "\t" + seconds(score);
      text += "\n";
    } else {
      text += start + " " + end;
      for (int64_t d = 0; d < info.embedding_dim; ++d) {
        text += " ";
        put_float(text, emb[d]);
      }
      text += "\n";
    }
  }
  if (o.json) text += "]}\n";
  std::fwrite(text.data(), 1, text.size(), stdout);
  if (std::fflush(stdout) != 0) throw std::runtime_error("cannot write to standard output");
  // After the output, so that an error is always the one line on stderr.
  if (info.random_init)
    std::cerr << "edgeenc-embed: warning: " << info.model_id << " has random weights (exported with --random-init)\n";
  if (o.timing) {
    std::fprintf(stderr, "timing: load_ms=%.1f decode_ms=%.1f infer_ms=%.1f windows=%zu per_window_ms=%.2f\n", load_ms,
                 decode_ms, infer_ms, spans.size(), infer_ms / static_cast<double>(spans.size()));
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(parse_args(argc, argv));
  } catch (const UsageError& e) {
    std::cerr << "edgeenc-embed: error: " << e.what() << "\n";
    return kExitUsage;
  } catch (const edgeenc::Error& e) {
    std::cerr << "edgeenc-embed: error: " << e.what() << "\n";
    return e.kind() == edgeenc::ErrorKind::Model ? kExitModel : kExitAudio;
  } catch (const std::exception& e) {
    std::cerr << "edgeenc-embed: error: " << e.what() << "\n";
    return 1;
  }
}

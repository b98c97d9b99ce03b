// Token shards (format, rejection messages), training/validation windows, and `prepare`.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <regex>
#include <set>

#include "io/dataset.h"
#include "tests/temp_dir_test.h"
#include "model/check.h"

namespace moe {
namespace {

namespace fs = std::filesystem;

class DatasetTest : public TempDirTest {
 protected:
  DatasetTest() : TempDirTest("moetrain_dataset_") {}


  // Our header with chosen fields, followed by `token_bytes` bytes of 1s.
  static std::string our_file(uint32_t version, uint32_t dtype, uint64_t count, size_t token_bytes) {
    std::string h(kShardHeaderBytes, '\0');
    std::memcpy(h.data(), kShardMagic, 8);
    std::memcpy(h.data() + 8, &version, 4);
    std::memcpy(h.data() + 12, &dtype, 4);
    std::memcpy(h.data() + 16, &count, 8);
    const uint32_t vocab = 256;
    std::memcpy(h.data() + 24, &vocab, 4);
    return h + std::string(token_bytes, '\1');
  }

  static std::string llmc_file(int32_t magic, int32_t version, int32_t count,
                               const std::vector<uint16_t>& tokens) {
    std::vector<int32_t> header(256, 0);
    header[0] = magic;
    header[1] = version;
    header[2] = count;
    std::string s(reinterpret_cast<const char*>(header.data()), header.size() * 4);
    s.append(reinterpret_cast<const char*>(tokens.data()), tokens.size() * 2);
    return s;
  }

  // The UserError message from opening `p`, or "" if it opened.
  static std::string open_error(const std::string& p) {
    try {
      TokenShard s(p);
    } catch (const UserError& e) {
      return e.what();
    }
    return "";
  }

  // A shard of n tokens whose token i is i % mod.
  std::string ramp_shard(const std::string& name, int64_t n, uint32_t mod) {
    std::vector<uint32_t> t(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) t[static_cast<size_t>(i)] = static_cast<uint32_t>(i % mod);
    const std::string p = path(name);
    shard_write(p, t, TokenDtype::kU32, 0);
    return p;
  }

};

// Expects a one-line message that starts with the path and contains `reason`.
void expect_message(const std::string& msg, const std::string& p, const std::string& reason) {
  EXPECT_EQ(msg.rfind(p + ": ", 0), 0u) << msg;
  EXPECT_NE(msg.find(reason), std::string::npos) << msg;
  EXPECT_EQ(msg.find('\n'), std::string::npos) << msg;
}

// ---- shard format -------------------------------------------------------------------------

TEST_F(DatasetTest, RoundTripAllDtypes) {
  struct Case {
    TokenDtype dtype;
    uint32_t max;
  };
  for (Case c : {Case{TokenDtype::kU8, 255u}, Case{TokenDtype::kU16, 65535u},
                 Case{TokenDtype::kU32, 0x7fffffffu}}) {
    std::vector<uint32_t> t = {0, 1, c.max, 7, c.max - 1, 42, 3};
    const std::string p = path("rt_" + std::to_string(static_cast<int>(c.dtype)) + ".bin");
    shard_write(p, t, c.dtype, c.max + 1);
    // Header, tokens, and one 8-byte checksum (the tokens fit one block).
    EXPECT_EQ(read_bytes(p).size(), kShardHeaderBytes + t.size() * static_cast<size_t>(c.dtype) + 8);
    TokenShard s(p);
    ASSERT_EQ(s.size(), static_cast<int64_t>(t.size()));
    EXPECT_EQ(s.vocab_size(), c.max + 1);
    EXPECT_EQ(s.path(), p);
    std::vector<int32_t> out(t.size(), -1);
    s.read(out.data(), 0, s.size(), 0);
    for (size_t i = 0; i < t.size(); ++i) {
      EXPECT_EQ(s.token(static_cast<int64_t>(i)), t[i]);
      EXPECT_EQ(out[i], static_cast<int32_t>(t[i]));
    }
    std::vector<int32_t> part(3);
    s.read(part.data(), 2, 3, 0);
    EXPECT_EQ(part, (std::vector<int32_t>{static_cast<int32_t>(c.max), 7, static_cast<int32_t>(c.max - 1)}));
  }
}

TEST_F(DatasetTest, WriteLeavesNoTemporaryAndCreatesFolders) {
  const std::string p = path("a/b/c/train.bin");
  shard_write(p, {1, 2, 3}, TokenDtype::kU8, 256);
  shard_write(p, {4, 5}, TokenDtype::kU8, 256);  // overwrite in place
  EXPECT_EQ(TokenShard(p).size(), 2);
  int n_entries = 0;
  for (const auto& e : fs::directory_iterator(fs::path(p).parent_path())) {
    EXPECT_EQ(e.path().filename(), "train.bin");
    ++n_entries;
  }
  EXPECT_EQ(n_entries, 1);
}

TEST_F(DatasetTest, WriteRejectsTokensTooWideForDtype) {
  const std::string p = path("wide.bin");
  try {
    shard_write(p, {1, 300}, TokenDtype::kU8, 256);
    FAIL() << "no error";
  } catch (const UserError& e) {
    expect_message(e.what(), p, "token 300 at index 1 does not fit uint8");
  }
  try {
    shard_write(p, {1, 16, 20}, TokenDtype::kU8, 16);
    FAIL() << "no error";
  } catch (const UserError& e) {
    expect_message(e.what(), p, "token 16 at index 1 exceeds vocabulary 16");
  }
  EXPECT_FALSE(fs::exists(p));
}

TEST_F(DatasetTest, WriteFailureNamesPath) {
  write_bytes(path("file"), "x");
  const std::string p = path("file/sub/train.bin");  // parent is a regular file
  try {
    shard_write(p, {1}, TokenDtype::kU8, 256);
    FAIL() << "no error";
  } catch (const UserError& e) {
    expect_message(e.what(), p, "cannot create directory");
  }
}

TEST_F(DatasetTest, ReadsLlmcShard) {
  std::vector<uint16_t> t = {50256, 15496, 11, 995, 0, 65535};
  const std::string p = path("llmc.bin");
  write_bytes(p, llmc_file(20240520, 1, static_cast<int32_t>(t.size()), t));
  TokenShard s(p);
  ASSERT_EQ(s.size(), 6);
  EXPECT_EQ(s.vocab_size(), 0u);
  for (size_t i = 0; i < t.size(); ++i) EXPECT_EQ(s.token(static_cast<int64_t>(i)), t[i]);
  std::vector<int32_t> out(6);
  s.read(out.data(), 0, 6, 0);
  EXPECT_EQ(out[0], 50256);
  EXPECT_EQ(out[5], 65535);
  try {
    s.read(out.data(), 0, 6, 50257);
    FAIL() << "no error";
  } catch (const UserError& e) {
    expect_message(e.what(), p, "token 65535 at byte 1034 (index 5) exceeds vocabulary 50257");
  }
}

// ---- rejections ---------------------------------------------------------------------------

TEST_F(DatasetTest, RejectsMissingFile) {
  const std::string p = path("nope.bin");
  expect_message(open_error(p), p, "cannot open: No such file or directory");
}

TEST_F(DatasetTest, RejectsTruncated) {
  const std::string p = path("short.bin");
  write_bytes(p, our_file(1, 2, 1000, 640));
  EXPECT_EQ(open_error(p),
            p + ": truncated at byte 704: header says 1000 tokens (2 bytes each), which need 2064 bytes");
  write_bytes(p, llmc_file(20240520, 1, 10, std::vector<uint16_t>(9, 1)));
  expect_message(open_error(p), p, "truncated at byte 1042: header says 10 tokens (2 bytes each), which need 1044 bytes");
}

TEST_F(DatasetTest, RejectsTrailingBytes) {
  const std::string p = path("long.bin");
  write_bytes(p, our_file(1, 4, 10, 41));
  expect_message(open_error(p), p,
                 "trailing bytes from byte 104: header says 10 tokens (4 bytes each), which need 104 bytes, "
                 "but the file holds 105");
  write_bytes(p, llmc_file(20240520, 1, 2, std::vector<uint16_t>(3, 1)));
  expect_message(open_error(p), p, "trailing bytes from byte 1028");
}

TEST_F(DatasetTest, RejectsHugeCountWithoutOverflow) {
  const std::string p = path("huge.bin");
  write_bytes(p, our_file(1, 4, ~uint64_t{0} / 2, 8));
  expect_message(open_error(p), p,
                 "truncated at byte 72: header says 9223372036854775807 tokens (4 bytes each), which need "
                 "36893488147419103292 bytes");
}

TEST_F(DatasetTest, RejectsWrongMagic) {
  const std::string p = path("magic.bin");
  std::string f = our_file(1, 1, 4, 4);
  f[3] = 'X';
  write_bytes(p, f);
  const std::string bad_magic = ": not a token shard (bad magic at byte 0: neither \"MOETOKS\" nor llm.c's 20240520)";
  EXPECT_EQ(open_error(p), p + bad_magic);
  write_bytes(p, "hello world, plain text\n");
  EXPECT_EQ(open_error(p), p + bad_magic);
  write_bytes(p, "hi");
  expect_message(open_error(p), p, "not a token shard (file is only 2 bytes)");
  write_bytes(p, "");
  expect_message(open_error(p), p, "not a token shard (file is empty)");
}

TEST_F(DatasetTest, RejectsHeaderShorterThanHeaderSize) {
  const std::string p = path("hdr.bin");
  write_bytes(p, our_file(1, 1, 4, 0).substr(0, 20));
  expect_message(open_error(p), p, "truncated at byte 20: smaller than the 64-byte shard header");
  write_bytes(p, llmc_file(20240520, 1, 4, {}).substr(0, 100));
  expect_message(open_error(p), p, "truncated at byte 100: smaller than the 1024-byte llm.c shard header");
}

TEST_F(DatasetTest, RejectsBadVersion) {
  const std::string p = path("ver.bin");
  write_bytes(p, our_file(3, 1, 4, 4));
  expect_message(open_error(p), p, "unsupported shard version 3 at byte 8 (this build reads versions 1 to 2)");
  write_bytes(p, llmc_file(20240520, 7, 1, {5}));
  expect_message(open_error(p), p, "unsupported llm.c shard version 7 at byte 4");
}

TEST_F(DatasetTest, RejectsBadDtype) {
  const std::string p = path("dtype.bin");
  write_bytes(p, our_file(1, 3, 4, 12));
  expect_message(open_error(p), p, "unknown token dtype 3 at byte 12");
}

TEST_F(DatasetTest, RejectsZeroTokens) {
  const std::string p = path("empty.bin");
  write_bytes(p, our_file(1, 2, 0, 0));
  EXPECT_EQ(open_error(p), p + ": holds zero tokens");
  write_bytes(p, llmc_file(20240520, 1, 0, {}));
  EXPECT_EQ(open_error(p), p + ": holds zero tokens");
  write_bytes(p, llmc_file(20240520, 1, -3, {}));
  expect_message(open_error(p), p, "negative token count -3 at byte 8");
}

TEST_F(DatasetTest, RejectsTokenOutsideVocab) {
  std::vector<uint32_t> t(40, 5);
  t[17] = 300;
  t[30] = 400;
  const std::string p = path("vocab.bin");
  shard_write(p, t, TokenDtype::kU16, 512);
  TokenShard s(p);
  std::vector<int32_t> out(40);
  s.read(out.data(), 0, 40, 512);  // fine under the file's own vocab
  s.read(out.data(), 0, 17, 256);  // fine before the bad token
  try {
    s.read(out.data(), 10, 30, 256);
    FAIL() << "no error";
  } catch (const UserError& e) {
    EXPECT_EQ(std::string(e.what()), p + ": token 300 at byte 98 (index 17) exceeds vocabulary 256");
  }
  try {
    s.read(out.data(), 0, 40, 300);  // token == vocab is out too
    FAIL() << "no error";
  } catch (const UserError& e) {
    expect_message(e.what(), p, "token 300 at byte 98 (index 17) exceeds vocabulary 300");
  }
}

TEST_F(DatasetTest, RejectsTokenBeyondInt32WithoutVocab) {
  const std::string p = path("big.bin");
  shard_write(p, {1, 0x80000000u}, TokenDtype::kU32, 0);
  TokenShard s(p);
  std::vector<int32_t> out(2);
  try {
    s.read(out.data(), 0, 2, 0);
    FAIL() << "no error";
  } catch (const UserError& e) {
    expect_message(e.what(), p, "token 2147483648 at byte 68 (index 1) does not fit int32");
  }
}

// ---- training windows ---------------------------------------------------------------------

TEST_F(DatasetTest, TrainBatchDeterministicAndSplitInvariant) {
  const std::string p = ramp_shard("train.bin", 10007, 1u << 30);
  TokenShard s(p);
  const int64_t B = 12, T = 33, T1 = T + 1;
  std::vector<int32_t> full(static_cast<size_t>(B * T1)), again(full.size()), pieces(full.size());
  dataset_train_batch(s, full.data(), 1234, 5, 0, B, T, 0);
  dataset_train_batch(s, again.data(), 1234, 5, 0, B, T, 0);
  EXPECT_EQ(full, again);
  // Cut [0, B) into uneven pieces, as micro-batches on several ranks would.
  const int64_t cuts[] = {0, 1, 4, 5, 11, 12};
  for (size_t c = 0; c + 1 < std::size(cuts); ++c)
    dataset_train_batch(s, pieces.data() + cuts[c] * T1, 1234, 5, cuts[c], cuts[c + 1] - cuts[c], T, 0);
  EXPECT_EQ(full, pieces);
  // Each window is a contiguous run of the data inside the shard.
  std::set<int32_t> starts;
  for (int64_t b = 0; b < B; ++b) {
    const int32_t start = full[static_cast<size_t>(b * T1)];
    EXPECT_GE(start, 0);
    EXPECT_LE(start, s.size() - T1);
    for (int64_t t = 0; t < T1; ++t)
      ASSERT_EQ(full[static_cast<size_t>(b * T1 + t)], static_cast<int32_t>(s.token(start + t)));
    starts.insert(start);
  }
  EXPECT_GT(starts.size(), static_cast<size_t>(B / 2));  // not all the same window
}

TEST_F(DatasetTest, TrainBatchDiffersAcrossStepsAndSeeds) {
  const std::string p = ramp_shard("train.bin", 100003, 1u << 30);
  TokenShard s(p);
  const int64_t B = 8, T = 16;
  std::vector<int32_t> a(static_cast<size_t>(B * (T + 1))), b(a.size()), c(a.size());
  dataset_train_batch(s, a.data(), 7, 0, 0, B, T, 0);
  dataset_train_batch(s, b.data(), 7, 1, 0, B, T, 0);
  dataset_train_batch(s, c.data(), 8, 0, 0, B, T, 0);
  EXPECT_NE(a, b);
  EXPECT_NE(a, c);
}

TEST_F(DatasetTest, TrainWindowsCoverTheShardUniformly) {
  // A shard with exactly 4 possible starts: every start is drawn, none out of range.
  const std::string p = ramp_shard("tiny.bin", 12, 1000);
  TokenShard s(p);
  const int64_t T = 8, B = 400;
  std::vector<int32_t> out(static_cast<size_t>(B * (T + 1)));
  dataset_train_batch(s, out.data(), 1, 3, 0, B, T, 256);
  int counts[4] = {0, 0, 0, 0};
  for (int64_t b = 0; b < B; ++b) {
    const int32_t start = out[static_cast<size_t>(b * (T + 1))];
    ASSERT_GE(start, 0);
    ASSERT_LE(start, 3);
    ++counts[start];
  }
  for (int c : counts) EXPECT_GT(c, 60);  // 100 expected each
  // A shard of exactly seq_len + 1 tokens has one window.
  dataset_train_batch(s, out.data(), 1, 3, 0, 2, 11, 256);
  EXPECT_EQ(out[0], 0);
  EXPECT_EQ(out[12], 0);
}

TEST_F(DatasetTest, TrainBatchRejectsShortShard) {
  const std::string p = ramp_shard("short.bin", 100, 256);
  TokenShard s(p);
  std::vector<int32_t> out(257);
  try {
    dataset_train_batch(s, out.data(), 1, 0, 0, 1, 256, 256);
    FAIL() << "no error";
  } catch (const UserError& e) {
    EXPECT_EQ(std::string(e.what()), p + ": 100 tokens is fewer than seq_len + 1 = 257");
  }
  try {
    dataset_val_batch(s, out.data(), 0, 1, 4, 256, 256);
    FAIL() << "no error";
  } catch (const UserError& e) {
    EXPECT_EQ(std::string(e.what()), p + ": 100 tokens is fewer than seq_len + 1 = 257");
  }
}

TEST_F(DatasetTest, TrainBatchChecksVocab) {
  const std::string p = ramp_shard("v.bin", 1000, 1000);  // tokens up to 999
  TokenShard s(p);
  std::vector<int32_t> out(static_cast<size_t>(64 * 101));
  EXPECT_THROW(dataset_train_batch(s, out.data(), 1, 0, 0, 64, 100, 256), UserError);
}

// ---- validation windows -------------------------------------------------------------------

TEST_F(DatasetTest, ValWindowsEvenlySpacedAndStable) {
  const int64_t N = 1001, T = 9, T1 = T + 1, W = 5;
  const std::string p = ramp_shard("val.bin", N, 1u << 30);
  TokenShard s(p);
  std::vector<int32_t> a(static_cast<size_t>(W * T1)), b(a.size()), pieces(a.size());
  dataset_val_batch(s, a.data(), 0, W, W, T, 0);
  dataset_val_batch(s, b.data(), 0, W, W, T, 0);
  EXPECT_EQ(a, b);
  dataset_val_batch(s, pieces.data(), 0, 2, W, T, 0);
  dataset_val_batch(s, pieces.data() + 2 * T1, 2, 3, W, T, 0);
  EXPECT_EQ(a, pieces);
  for (int64_t w = 0; w < W; ++w) {
    const int64_t expect = w * (N - T1) / (W - 1);  // 0, 247, 495, 742, 991
    for (int64_t t = 0; t < T1; ++t) EXPECT_EQ(a[static_cast<size_t>(w * T1 + t)], expect + t);
  }
  EXPECT_EQ(a[0], 0);
  EXPECT_EQ(a.back(), N - 1);  // the last window ends at the end of the shard
  // One window starts at 0.
  std::vector<int32_t> one(static_cast<size_t>(T1));
  dataset_val_batch(s, one.data(), 0, 1, 1, T, 0);
  EXPECT_EQ(one[0], 0);
}

// ---- prepare ------------------------------------------------------------------------------

std::string shard_text(const std::string& p) {
  TokenShard s(p);
  std::string out;
  for (int64_t i = 0; i < s.size(); ++i) out.push_back(static_cast<char>(s.token(i)));
  EXPECT_EQ(s.vocab_size(), 256u);
  return out;
}

TEST_F(DatasetTest, PrepareFolderSkipsBinaryAndSymlinks) {
  std::string a, b;
  for (int i = 0; i < 20; ++i) a += "alpha line " + std::to_string(i) + "\n";
  for (int i = 0; i < 30; ++i) b += "beta " + std::to_string(i) + " text\n";
  write_bytes(path("in/b.txt"), b);
  write_bytes(path("in/sub/a"), a);
  write_bytes(path("in/a.dat"), std::string("\x01\x00\x02 binary", 9));
  fs::create_symlink("b.txt", path("in/b.u8"));
  fs::create_directories(path("in/empty"));

  const std::string out = path("out");
  const std::string summary = dataset_prepare({path("in")}, out, 0.1);
  const std::string train = shard_text(out + "/train.bin");
  const std::string val = shard_text(out + "/val.bin");
  EXPECT_EQ(train.size() + val.size(), a.size() + b.size());
  EXPECT_NE(summary.find(strprintf("prepared 2 files, %zu bytes: %zu train tokens, %zu val tokens -> %s",
                                   a.size() + b.size(), train.size(), val.size(), out.c_str())),
            std::string::npos)
      << summary;
  EXPECT_NE(summary.find("skipped 1 binary files, 1 symlinks"), std::string::npos) << summary;

  // Sorted order: in/b.txt < in/sub/a. Each file's tail (from a line start) goes to val.
  const size_t cut_b = b.find('\n', b.size() - b.size() / 10 - 1) + 1;
  const size_t cut_a = a.find('\n', a.size() - a.size() / 10 - 1) + 1;
  EXPECT_EQ(train, b.substr(0, cut_b) + a.substr(0, cut_a));
  EXPECT_EQ(val, b.substr(cut_b) + a.substr(cut_a));
  EXPECT_GT(val.size(), 0u);
  EXPECT_EQ(val.substr(0, 5), "beta ");  // starts at a line
}

TEST_F(DatasetTest, PrepareIsDeterministic) {
  for (const char* name : {"z", "m/k", "a", "m/b"})
    write_bytes(path(std::string("in/") + name), std::string(name) + " one\n" + name + " two\n" + name + " three\n");
  dataset_prepare({path("in")}, path("o1"), 0.5);
  dataset_prepare({path("in")}, path("o2"), 0.5);
  EXPECT_EQ(read_bytes(path("o1/train.bin")), read_bytes(path("o2/train.bin")));
  EXPECT_EQ(read_bytes(path("o1/val.bin")), read_bytes(path("o2/val.bin")));
  const std::string train = shard_text(path("o1/train.bin"));
  EXPECT_EQ(train.substr(0, 2), "a ");
  EXPECT_LT(train.find("m/b one"), train.find("m/k one"));
  EXPECT_LT(train.find("m/k one"), train.find("z one"));
  EXPECT_EQ(shard_text(path("o1/val.bin")), "a three\nm/b three\nm/k three\nz three\n");
}

TEST_F(DatasetTest, PrepareShortFileGoesToTrain) {
  write_bytes(path("in/long"), std::string(200, 'x') + "\n" + std::string(50, 'y') + "\n");
  write_bytes(path("in/short"), "hi\n");  // 3 bytes * 0.25 < 1: nothing to split off
  write_bytes(path("in/oneline"), std::string(100, 'z'));  // no line start after the cut
  dataset_prepare({path("in")}, path("out"), 0.25);
  EXPECT_EQ(shard_text(path("out/train.bin")), std::string(200, 'x') + "\n" + std::string(100, 'z') + "hi\n");
  EXPECT_EQ(shard_text(path("out/val.bin")), std::string(50, 'y') + "\n");
}

TEST_F(DatasetTest, PrepareExplicitFiles) {
  const std::string text = "line one\nline two\nline three\nline four\n";
  write_bytes(path("t.txt"), text);
  fs::create_symlink("t.txt", path("link.txt"));
  // An explicit symlink is followed; the same file twice counts once.
  const std::string summary = dataset_prepare({path("link.txt"), path("t.txt")}, path("out"), 0.3);
  EXPECT_EQ(summary.rfind("prepared 1 files", 0), 0u) << summary;
  EXPECT_EQ(shard_text(path("out/val.bin")), "line four\n");

  write_bytes(path("bin.dat"), std::string("ab\0cd", 5));
  try {
    dataset_prepare({path("t.txt"), path("bin.dat")}, path("out2"), 0.25);
    FAIL() << "no error";
  } catch (const UserError& e) {
    expect_message(e.what(), path("bin.dat"), "binary file");
  }
  EXPECT_FALSE(fs::exists(path("out2")));
}

TEST_F(DatasetTest, PrepareErrors) {
  try {
    dataset_prepare({path("missing")}, path("out"), 0.1);
    FAIL() << "no error";
  } catch (const UserError& e) {
    EXPECT_EQ(std::string(e.what()), path("missing") + ": cannot open: No such file or directory");
  }
  fs::create_directories(path("empty/sub"));
  write_bytes(path("empty/x.dat"), std::string("\0\0", 2));
  write_bytes(path("empty/zero"), "");
  try {
    dataset_prepare({path("empty")}, path("out"), 0.1);
    FAIL() << "no error";
  } catch (const UserError& e) {
    EXPECT_NE(std::string(e.what()).find("prepare: no text found in " + path("empty")), std::string::npos)
        << e.what();
  }
  write_bytes(path("short/a"), "tiny\n");
  try {
    dataset_prepare({path("short")}, path("out"), 0.1);
    FAIL() << "no error";
  } catch (const UserError& e) {
    EXPECT_NE(std::string(e.what()).find("validation split is empty"), std::string::npos) << e.what();
  }
  EXPECT_THROW(dataset_prepare({}, path("out"), 0.1), UserError);
  EXPECT_THROW(dataset_prepare({path("short")}, path("out"), 0.0), UserError);
  EXPECT_THROW(dataset_prepare({path("short")}, path("out"), 1.0), UserError);
  EXPECT_FALSE(fs::exists(path("out")));
}

TEST_F(DatasetTest, PrepareFortunesCorpus) {
  const std::string corpus = "/usr/share/games/fortunes";
  if (!fs::is_directory(corpus)) GTEST_SKIP() << corpus << " not installed (Debian package fortunes)";
  const std::string summary = dataset_prepare({corpus}, path("fortunes"), 0.05);
  TokenShard train(path("fortunes/train.bin")), val(path("fortunes/val.bin"));
  const int64_t total = train.size() + val.size();
  EXPECT_GT(total, 1'000'000) << summary;
  EXPECT_GT(val.size(), total / 40) << summary;
  EXPECT_LT(val.size(), total / 10) << summary;
  std::vector<int32_t> out(static_cast<size_t>(train.size()));
  train.read(out.data(), 0, train.size(), 256);
  for (int32_t t : out) ASSERT_NE(t, 0);  // no NUL bytes from .dat files
}

}  // namespace
}  // namespace moe

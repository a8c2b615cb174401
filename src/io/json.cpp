#include "io/json.h"

#include <cmath>
#include <cstdlib>
#include <unordered_set>

#include "opencamp/error.h"

namespace opencamp::json {

Value Value::make_bool(bool b) {
  Value v;
  v.type_ = Type::Bool;
  v.bool_ = b;
  return v;
}
Value Value::make_number(double n) {
  Value v;
  v.type_ = Type::Number;
  v.number_ = n;
  return v;
}
Value Value::make_string(std::string s) {
  Value v;
  v.type_ = Type::String;
  v.string_ = std::move(s);
  return v;
}
Value Value::make_array(std::vector<Value> items) {
  Value v;
  v.type_ = Type::Array;
  v.items_ = std::move(items);
  return v;
}
Value Value::make_object(std::vector<std::pair<std::string, Value>> members) {
  Value v;
  v.type_ = Type::Object;
  v.members_ = std::move(members);
  return v;
}

const Value* Value::find(std::string_view key) const {
  if (type_ != Type::Object) return nullptr;
  for (const auto& member : members_) {  // keys are unique: the parser refuses duplicates
    if (member.first == key) return &member.second;
  }
  return nullptr;
}

const char* type_name(Value::Type type) {
  switch (type) {
    case Value::Type::Null: return "null";
    case Value::Type::Bool: return "a boolean";
    case Value::Type::Number: return "a number";
    case Value::Type::String: return "a string";
    case Value::Type::Array: return "an array";
    case Value::Type::Object: return "an object";
  }
  return "?";
}

size_t utf8_sequence_length(std::string_view text, size_t pos) {
  const auto byte = [&](size_t i) { return static_cast<unsigned char>(text[pos + i]); };
  const unsigned char lead = byte(0);
  if (lead < 0x80) return 1;
  size_t length = 0;
  unsigned code = 0, minimum = 0;
  if (lead >= 0xc2 && lead <= 0xdf) {
    length = 2, code = lead & 0x1fu, minimum = 0x80;
  } else if (lead >= 0xe0 && lead <= 0xef) {
    length = 3, code = lead & 0x0fu, minimum = 0x800;
  } else if (lead >= 0xf0 && lead <= 0xf4) {
    length = 4, code = lead & 0x07u, minimum = 0x10000;
  } else {
    return 0;  // a continuation byte, or a lead byte no valid sequence has
  }
  if (pos + length > text.size()) return 0;
  for (size_t i = 1; i < length; ++i) {
    if ((byte(i) & 0xc0u) != 0x80u) return 0;
    code = (code << 6) | (byte(i) & 0x3fu);
  }
  // Overlong forms, UTF-16 surrogates and code points past U+10FFFF are not UTF-8.
  if (code < minimum || code > 0x10ffff || (code >= 0xd800 && code < 0xe000)) return 0;
  return length;
}

bool is_valid_utf8(std::string_view text) {
  for (size_t pos = 0; pos < text.size();) {
    const size_t length = utf8_sequence_length(text, pos);
    if (length == 0) return false;
    pos += length;
  }
  return true;
}

namespace {

constexpr int kMaxDepth = 256;

class Parser {
 public:
  Parser(std::string_view text, const std::string& source) : text_(text), source_(source) {}

  Value document() {
    Value v = value(0);
    skip_space();
    if (pos_ != text_.size()) error("unexpected text after the JSON value");
    return v;
  }

 private:
  [[noreturn]] void error(const std::string& what) const {
    size_t line = 1, column = 1;
    for (size_t i = 0; i < pos_ && i < text_.size(); ++i) {
      if (text_[i] == '\n') {
        ++line;
        column = 1;
      } else {
        ++column;
      }
    }
    fail(ErrorKind::InvalidModel, source_, ": malformed JSON at line ", line, ", column ", column,
         ": ", what);
  }

  void skip_space() {
    while (pos_ < text_.size() &&
           (text_[pos_] == ' ' || text_[pos_] == '\t' || text_[pos_] == '\n' || text_[pos_] == '\r')) {
      ++pos_;
    }
  }

  char peek() const { return pos_ < text_.size() ? text_[pos_] : '\0'; }

  void expect_literal(std::string_view literal) {
    if (text_.substr(pos_, literal.size()) != literal) {
      error("expected '" + std::string(literal) + "'");
    }
    pos_ += literal.size();
  }

  Value value(int depth) {
    if (depth > kMaxDepth) error("nesting deeper than 256 levels");
    skip_space();
    if (pos_ >= text_.size()) error("unexpected end of input, expected a value");
    switch (text_[pos_]) {
      case '{': return object(depth);
      case '[': return array(depth);
      case '"': return Value::make_string(string());
      case 't': expect_literal("true"); return Value::make_bool(true);
      case 'f': expect_literal("false"); return Value::make_bool(false);
      case 'n': expect_literal("null"); return Value();
      // Python's json writes these for non-finite floats; configs in the wild contain them.
      case 'N': expect_literal("NaN"); return Value::make_number(std::nan(""));
      case 'I': expect_literal("Infinity"); return Value::make_number(INFINITY);
      default: return number();
    }
  }

  Value object(int depth) {
    ++pos_;  // '{'
    std::vector<std::pair<std::string, Value>> members;
    std::unordered_set<std::string> keys;
    skip_space();
    if (peek() == '}') {
      ++pos_;
      return Value::make_object(std::move(members));
    }
    for (;;) {
      skip_space();
      if (peek() != '"') error("expected a string key");
      const size_t key_at = pos_;
      std::string key = string();
      // Readers disagree on which duplicate wins (Python: the last, Rust serde: an error, some
      // the first), so a header or config saying two things is refused, not guessed at.
      if (!keys.insert(key).second) {
        pos_ = key_at;
        error("key \"" + key + "\" appears twice in one object");
      }
      skip_space();
      if (peek() != ':') error("expected ':' after a key");
      ++pos_;
      members.emplace_back(std::move(key), value(depth + 1));
      skip_space();
      if (peek() == ',') {
        ++pos_;
        continue;
      }
      if (peek() == '}') {
        ++pos_;
        return Value::make_object(std::move(members));
      }
      error("expected ',' or '}' in an object");
    }
  }

  Value array(int depth) {
    ++pos_;  // '['
    std::vector<Value> items;
    skip_space();
    if (peek() == ']') {
      ++pos_;
      return Value::make_array(std::move(items));
    }
    for (;;) {
      items.push_back(value(depth + 1));
      skip_space();
      if (peek() == ',') {
        ++pos_;
        continue;
      }
      if (peek() == ']') {
        ++pos_;
        return Value::make_array(std::move(items));
      }
      error("expected ',' or ']' in an array");
    }
  }

  Value number() {
    const size_t start = pos_;
    if (peek() == '-') ++pos_;
    if (peek() == 'I') {
      expect_literal("Infinity");
      return Value::make_number(-INFINITY);
    }
    auto digits = [&] {
      const size_t from = pos_;
      while (pos_ < text_.size() && text_[pos_] >= '0' && text_[pos_] <= '9') ++pos_;
      return pos_ > from;
    };
    if (!digits()) error("expected a value");
    if (peek() == '.') {
      ++pos_;
      if (!digits()) error("expected digits after '.'");
    }
    if (peek() == 'e' || peek() == 'E') {
      ++pos_;
      if (peek() == '+' || peek() == '-') ++pos_;
      if (!digits()) error("expected digits in the exponent");
    }
    const std::string literal(text_.substr(start, pos_ - start));
    return Value::make_number(std::strtod(literal.c_str(), nullptr));
  }

  unsigned hex4() {
    if (pos_ + 4 > text_.size()) error("truncated \\u escape");
    unsigned code = 0;
    for (int i = 0; i < 4; ++i) {
      const char c = text_[pos_++];
      code <<= 4;
      if (c >= '0' && c <= '9') code |= static_cast<unsigned>(c - '0');
      else if (c >= 'a' && c <= 'f') code |= static_cast<unsigned>(c - 'a' + 10);
      else if (c >= 'A' && c <= 'F') code |= static_cast<unsigned>(c - 'A' + 10);
      else error("bad hex digit in \\u escape");
    }
    return code;
  }

  static void append_utf8(std::string& out, unsigned code) {
    if (code < 0x80) {
      out += static_cast<char>(code);
    } else if (code < 0x800) {
      out += static_cast<char>(0xc0 | (code >> 6));
      out += static_cast<char>(0x80 | (code & 0x3f));
    } else if (code < 0x10000) {
      out += static_cast<char>(0xe0 | (code >> 12));
      out += static_cast<char>(0x80 | ((code >> 6) & 0x3f));
      out += static_cast<char>(0x80 | (code & 0x3f));
    } else {
      out += static_cast<char>(0xf0 | (code >> 18));
      out += static_cast<char>(0x80 | ((code >> 12) & 0x3f));
      out += static_cast<char>(0x80 | ((code >> 6) & 0x3f));
      out += static_cast<char>(0x80 | (code & 0x3f));
    }
  }

  // One multi-byte UTF-8 character starting at pos_, appended to `out`: every string handed
  // out is valid UTF-8 (names reach Python as str).
  void utf8_sequence(std::string& out) {
    const size_t length = utf8_sequence_length(text_, pos_);
    if (length == 0) error("invalid UTF-8 inside a string");
    out.append(text_.substr(pos_, length));
    pos_ += length;
  }

  std::string string() {
    ++pos_;  // opening quote
    std::string out;
    for (;;) {
      if (pos_ >= text_.size()) error("unterminated string");
      const char c = text_[pos_++];
      if (c == '"') return out;
      if (static_cast<unsigned char>(c) < 0x20) error("control character inside a string");
      if (static_cast<unsigned char>(c) >= 0x80) {
        --pos_;
        utf8_sequence(out);
        continue;
      }
      if (c != '\\') {
        out += c;
        continue;
      }
      if (pos_ >= text_.size()) error("unterminated escape");
      const char e = text_[pos_++];
      switch (e) {
        case '"': out += '"'; break;
        case '\\': out += '\\'; break;
        case '/': out += '/'; break;
        case 'b': out += '\b'; break;
        case 'f': out += '\f'; break;
        case 'n': out += '\n'; break;
        case 'r': out += '\r'; break;
        case 't': out += '\t'; break;
        case 'u': {
          unsigned code = hex4();
          if (code >= 0xdc00 && code < 0xe000) error("unpaired low surrogate in a \\u escape");
          if (code >= 0xd800 && code < 0xdc00) {
            if (text_.substr(pos_, 2) != "\\u") error("unpaired high surrogate in a \\u escape");
            pos_ += 2;
            const unsigned low = hex4();
            if (low >= 0xdc00 && low < 0xe000) {
              code = 0x10000 + ((code - 0xd800) << 10) + (low - 0xdc00);
            } else {
              error("invalid surrogate pair");
            }
          }
          append_utf8(out, code);
          break;
        }
        default: error(std::string("unknown escape '\\") + e + "'");
      }
    }
  }

  std::string_view text_;
  const std::string& source_;
  size_t pos_ = 0;
};

}  // namespace

Value parse(std::string_view text, const std::string& source) {
  return Parser(text, source).document();
}

}  // namespace opencamp::json

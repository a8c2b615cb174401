// A small JSON reader for config files and safetensors headers. Errors say where (line and
// column) and what was expected, prefixed with the name of the source.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace opencamp::json {

class Value {
 public:
  enum class Type { Null, Bool, Number, String, Array, Object };

  Value() = default;
  static Value make_bool(bool b);
  static Value make_number(double n);
  static Value make_string(std::string s);
  static Value make_array(std::vector<Value> items);
  static Value make_object(std::vector<std::pair<std::string, Value>> members);

  Type type() const { return type_; }
  bool is_null() const { return type_ == Type::Null; }
  bool is_bool() const { return type_ == Type::Bool; }
  bool is_number() const { return type_ == Type::Number; }
  bool is_string() const { return type_ == Type::String; }
  bool is_array() const { return type_ == Type::Array; }
  bool is_object() const { return type_ == Type::Object; }

  bool as_bool() const { return bool_; }
  double as_number() const { return number_; }
  const std::string& as_string() const { return string_; }
  const std::vector<Value>& as_array() const { return items_; }
  const std::vector<std::pair<std::string, Value>>& as_object() const { return members_; }

  // The member named `key`, or nullptr when absent or when this is not an object.
  const Value* find(std::string_view key) const;

 private:
  Type type_ = Type::Null;
  bool bool_ = false;
  double number_ = 0.0;
  std::string string_;
  std::vector<Value> items_;
  std::vector<std::pair<std::string, Value>> members_;
};

const char* type_name(Value::Type type);

// The length of the UTF-8 sequence at text[pos] (1 to 4), or 0 when the bytes there are not
// valid UTF-8 (stray continuation bytes, overlong forms, surrogates, past U+10FFFF, cut off).
size_t utf8_sequence_length(std::string_view text, size_t pos);
bool is_valid_utf8(std::string_view text);

// Parses one JSON document (strict: strings must be valid UTF-8 with paired surrogate escapes,
// an object may not repeat a key). Throws opencamp::Error(InvalidModel) "<source>: malformed JSON at
// line L, column C: ...".
Value parse(std::string_view text, const std::string& source);

}  // namespace opencamp::json
